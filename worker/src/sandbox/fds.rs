//! Step 1: close every file descriptor the worker was not meant to have.
//!
//! A worker must not inherit anything by accident (a broker bug, a test
//! harness's pipes, a leaked directory fd would all be ways out of the
//! sandbox: landlock only checks paths opened later, not fds already held).
//! We close everything except an explicit keep list with `close_range(2)`,
//! which needs no `/proc` and cannot miss an fd.

use std::io;
use std::os::fd::RawFd;

/// Close every fd not in `keep`. stdin/stdout/stderr are kept only if listed.
pub fn close_all_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF)))
        .collect::<io::Result<_>>()?;
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for fd in keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    close_range(first, u32::MAX)
}

/// `close_range(first, last, 0)`: closes `first..=last`.
fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; no memory is passed. The
    // caller owns every fd in the range by definition of "stray".
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The fds this process has open now, from `/proc/self/fd` (for tests and
/// diagnostics; confinement itself does not depend on /proc).
pub fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            fds.push(fd);
        }
    }
    fds.sort_unstable();
    Ok(fds)
}
