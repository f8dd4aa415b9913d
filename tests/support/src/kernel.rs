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

/// The calling thread's kernel id (for [`wait_blocked_in_kernel`]).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Wait up to `limit` until thread `tid` of this process sleeps
/// uninterruptibly (`D`): it is blocked in the kernel, e.g. on I/O that
/// nothing answers yet. The event a test waits for before it acts on
/// "I/O in flight", instead of sleeping and hoping. `false` when the
/// thread never blocked (or ended) within `limit`.
pub fn wait_blocked_in_kernel(tid: i32, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    let stat = format!("/proc/self/task/{tid}/stat");
    loop {
        let Ok(s) = std::fs::read_to_string(&stat) else {
            return false;
        };
        if s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('D'))
        {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Spawn `f` on a thread and return its handle and kernel thread id.
pub fn spawn_with_tid<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (std::thread::JoinHandle<T>, i32) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(gettid());
        f()
    });
    let tid = rx.recv().expect("the spawned thread reports its id");
    (h, tid)
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

/// The open flags of fd `fd` of process `pid`, from `/proc/PID/fdinfo`
/// (what the kernel really holds, whatever the process believes).
pub fn fd_flags(pid: u32, fd: i32) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(flags.trim(), 8).ok()
}

/// Whether process `pid` holds `path` open with `O_DIRECT`: `None` when it
/// has no fd on `path`, else whether every fd it has there is direct.
pub fn holds_open_direct(pid: u32, path: &std::path::Path) -> Option<bool> {
    let want = std::fs::canonicalize(path).ok()?;
    let mut seen = None;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target != want {
            continue;
        }
        let fd: i32 = e.file_name().to_str()?.parse().ok()?;
        let direct = fd_flags(pid, fd)? & libc::O_DIRECT != 0;
        seen = Some(seen.unwrap_or(true) && direct);
    }
    seen
}

/// Whether files in `dir` can be read with `O_DIRECT` (a probe file is
/// written, opened `O_DIRECT` and read with an aligned buffer).
pub fn dir_supports_o_direct(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let probe = dir.join(format!(".tapjail-direct-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, vec![0u8; 4096]).is_ok()
        && std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok_and(|f| {
                let mut buf = crate::Aligned::new(4096);
                f.read_at(buf.buf(), 0).is_ok_and(|n| n == 4096)
            });
    let _ = std::fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_flags_and_holds_open_direct_see_what_the_kernel_holds() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir();
        let p = dir.join(format!("tapjail-flags-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let f = File::open(&p).unwrap();
        let me = std::process::id();
        assert_eq!(
            fd_flags(me, f.as_raw_fd()).unwrap() & libc::O_ACCMODE,
            libc::O_RDONLY
        );
        assert_eq!(holds_open_direct(me, &p), Some(false));
        drop(f);
        assert_eq!(holds_open_direct(me, &p), None);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_thread_blocked_on_a_pipe_is_not_in_d_state_and_one_that_ends_is_reported() {
        // A read on an empty pipe sleeps interruptibly (S), never D.
        let (r, w) = std::io::pipe().unwrap();
        let (h, tid) = spawn_with_tid(move || {
            let mut b = [0u8; 1];
            std::io::Read::read(&mut &r, &mut b).unwrap()
        });
        assert!(!wait_blocked_in_kernel(
            tid,
            std::time::Duration::from_millis(50)
        ));
        drop(w);
        assert_eq!(h.join().unwrap(), 0);
        assert!(!wait_blocked_in_kernel(
            tid,
            std::time::Duration::from_secs(1)
        ));
    }

    #[test]
    fn this_test_is_not_in_d_state() {
        let me = format!("{} (", std::process::id());
        assert!(tasks_in_d_state().iter().all(|t| !t.starts_with(&me)));
    }
}
