//! Kernel state the device tests check, and the lock that makes the FUSE +
//! loop tests take turns.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Tasks in uninterruptible sleep (`D`), as `pid (comm)`: a device test
/// that leaves one has hung I/O, whatever it asserted.
pub fn tasks_in_d_state() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) {
            // pid (comm) S ...: the state follows the last ')'.
            if let Some((head, tail)) = stat.rsplit_once(')') {
                if tail.trim_start().starts_with('D') {
                    out.push(format!("{head})"));
                }
            }
        }
    }
    out
}

/// The ublk char devices that exist (`ublkcN`), from sysfs.
pub fn ublk_char_devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/ublk-char")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The lock every FUSE + loop test holds for its whole run, in every test
/// binary and every checkout on this host: a loop device one test frees is
/// taken at once by another's FUSE disk (whose backing file is also
/// `/disk`), which would make "left bound" checks see a neighbour's device.
/// Blocks until the lock is ours; released when the file is dropped.
pub fn fuse_loop_turn() -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/tapjail-fuse-loop-tests.lock")?;
    // SAFETY: flock on an fd we own; blocks until the lock is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_is_not_in_d_state() {
        let me = format!("{} (", std::process::id());
        assert!(tasks_in_d_state().iter().all(|t| !t.starts_with(&me)));
    }
}
