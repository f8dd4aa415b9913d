//! Handing the live device to a worker (fresh or after a death) and
//! taking it over from a broker that is gone.

use super::{io_err, FuseBackend, FILE_NAME};
use crate::device::factory::DeviceContext;
use crate::device::fuse_mount::{self, FuseMount};
use crate::device::loop_dev::LoopDevice;
use crate::device::{DeviceError, Handoff, KeptFds, Prepared};
use std::fs::File;
use std::os::fd::AsFd;
use tapjail_common::worker_proto::FrontendSpec;

impl FuseBackend {
    /// Take over a live device from a broker that is gone: the
    /// connection, the mount's root, the disk file and the loop device,
    /// checked against each other (the loop device must be bound to that
    /// very file on that mount).
    pub fn adopt(ctx: &DeviceContext, h: &Handoff, fds: &mut KeptFds) -> Result<Self, DeviceError> {
        let what = "fuse: adopting";
        let conn = fds.take(what, "fuse")?;
        let root = fds.take(what, "mount")?;
        let file = File::from(fds.take(what, "file")?);
        let loop_file = File::from(fds.take(what, "loop")?);
        let number = h
            .loop_number
            .ok_or_else(|| DeviceError::Failed(format!("{what}: no loop number recorded")))?;
        let mount = FuseMount::adopt(root, h.mount_dir.clone())
            .map_err(|e| DeviceError::Failed(format!("{what}: {e}")))?;
        // The file must live on this mount (same superblock; statx
        // without sync, so a dead server is not asked).
        let on = fuse_mount::connection_id(file.as_fd())
            .map_err(io_err("fuse: statx the adopted disk file"))?;
        if on != mount.connection() {
            return Err(DeviceError::Failed(format!(
                "{what}: the kept disk file is not on the kept mount"
            )));
        }
        let loop_dev = LoopDevice::adopt(loop_file, number)
            .map_err(|e| DeviceError::Failed(format!("{what}: {e}")))?;
        let mut b = FuseBackend::from_context(ctx)?;
        b.read_only = h.read_only;
        b.size = h.size;
        b.conn = Some(conn);
        b.mount = Some(mount);
        b.file = Some(file);
        b.loop_dev = Some(loop_dev);
        b.restarts = h.restarts;
        Ok(b)
    }

    pub(super) fn handoff(&self, resend: bool) -> Result<Prepared, DeviceError> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| DeviceError::Failed("fuse: no connection (not prepared)".into()))?;
        let dup = conn
            .try_clone()
            .map_err(io_err("fuse: dup /dev/fuse connection"))?;
        Ok(Prepared {
            spec: FrontendSpec::Fuse {
                file_name: FILE_NAME.into(),
                resend,
            },
            fds: vec![dup],
        })
    }
}
