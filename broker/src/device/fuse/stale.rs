//! Where the mount(2) fallback mounts, and removing what a previous
//! broker left there.

use super::io_err;
use crate::device::factory::DeviceContext;
use crate::device::fuse_mount;
use crate::device::DeviceError;
use std::io;
use std::path::{Path, PathBuf};
use tapjail_common::Minor;

/// Where the mount(2) fallback mounts minor `minor`'s filesystem.
pub(super) fn mount_dir(state_dir: &Path, minor: Minor) -> PathBuf {
    state_dir.join("fuse").join(minor.device_name())
}

/// Remove what a previous broker's FUSE backend left for `ctx.minor`.
///
/// A detached mount and its connection die with the broker that held them,
/// and its loop device (autoclear) with the last close of it, so only the
/// mount(2) fallback can leave something: a mount on
/// `state_dir/fuse/tapdevN` (lazily unmounted) and its directory.
pub fn cleanup_stale(ctx: &DeviceContext) -> Result<Vec<String>, DeviceError> {
    let dir = mount_dir(&ctx.state_dir, ctx.minor);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(DeviceError::Failed(format!(
                "{} exists and is not a directory; not touching it",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DeviceError::Io {
                step: format!("inspecting {}", dir.display()),
                source,
            })
        }
    }
    fuse_mount::lazy_unmount(&dir).map_err(|e| DeviceError::Failed(e.to_string()))?;
    std::fs::remove_dir(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
    Ok(vec![format!(
        "removed stale FUSE mount point {}",
        dir.display()
    )])
}
