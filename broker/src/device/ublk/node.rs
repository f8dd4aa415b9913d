//! The `/dev/ublkcN` and `/dev/ublkbN` nodes: waiting for them to appear
//! and making sure the node we open is the device the driver told us about.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long devtmpfs / udev may take to create a node.
pub const NODE_WAIT: Duration = Duration::from_secs(10);

pub fn char_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{dev_id}"))
}

pub fn block_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

/// Whether `path` is a device node of the given kind with device number
/// `major:minor`.
fn node_matches(path: &Path, block: bool, major: u32, minor: u32) -> io::Result<bool> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let kind_ok = if block {
        md.file_type().is_block_device()
    } else {
        md.file_type().is_char_device()
    };
    Ok(kind_ok && md.rdev() == libc::makedev(major, minor))
}

/// Wait until `path` is the expected device node.
pub fn wait_node(path: &Path, block: bool, major: u32, minor: u32) -> io::Result<()> {
    let deadline = Instant::now() + NODE_WAIT;
    loop {
        if node_matches(path, block, major, minor)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not appear as {} device {major}:{minor} within {} s",
                    path.display(),
                    if block { "block" } else { "char" },
                    NODE_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open `/dev/ublkcN` for a worker, close-on-exec, and check that what we
/// opened is char device `major:minor` (not something put in its place).
/// `EBUSY` from the driver means another fd of it is open somewhere.
pub fn open_char(dev_id: u32, major: u32, minor: u32) -> io::Result<File> {
    let path = char_path(dev_id);
    wait_node(&path, false, major, minor)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)?;
    let md = file.metadata()?;
    if !md.file_type().is_char_device() || md.rdev() != libc::makedev(major, minor) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not char device {major}:{minor}; refusing it",
                path.display()
            ),
        ));
    }
    Ok(file)
}
