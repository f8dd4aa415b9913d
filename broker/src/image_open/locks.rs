//! One writer per image, the way qemu does it (`file-posix.c`,
//! `raw_apply_lock_bytes` / `raw_check_lock_bytes`): open file description
//! (OFD) locks on single bytes. Byte `100 + p` held shared means "I use
//! permission p"; byte `200 + p` held shared means "I do not let anyone
//! else have permission p". Before using p one checks that nobody holds
//! `200 + p`; before refusing p to others one checks that nobody holds
//! `100 + p` (a test for an exclusive lock, `F_OFD_GETLK`).
//!
//! The lock belongs to the open file description, not to a process: the
//! broker's helper takes it, the worker inherits the fd, and it lasts as
//! long as the worker keeps the image open, broker or no broker. It is
//! advisory: it stops qemu, qemu-img, qemu-storage-daemon and other
//! tapjail brokers, not a plain `dd`.
//!
//! The functions that take and test locks run in the forked open helper:
//! raw `fcntl`s only, no allocation.

use std::os::fd::{AsRawFd, BorrowedFd};

/// qemu's `BLK_PERM_CONSISTENT_READ` bit index.
const PERM_READ: i64 = 0;
/// `BLK_PERM_WRITE`.
const PERM_WRITE: i64 = 1;
/// `BLK_PERM_RESIZE`.
const PERM_RESIZE: i64 = 3;
/// `RAW_LOCK_PERM_BASE`.
const PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`.
const SHARED_BASE: i64 = 200;

/// What one open asks for, in qemu's terms.
#[derive(Debug, Clone, Copy)]
pub struct LockPlan {
    /// Permissions used (bit indices).
    used: &'static [i64],
    /// Permissions refused to everyone else.
    unshared: &'static [i64],
    /// Check that nobody uses what we refuse (false only for
    /// [`LEAF_BECOMING_PARENT`] and [`LEAF_AGAIN`]).
    check_unshared: bool,
    /// Check that nobody refuses what we use (false only for the online
    /// coalesce's reopens, whose own worker refuses it).
    check_used: bool,
}

/// Every plan, so that one can cross a process boundary as its index
/// (the pre-started opener, [`super::opener`]).
pub const PLANS: [LockPlan; 7] = [
    WRITER,
    READER,
    CACHE_READER,
    NONE,
    LEAF_BECOMING_PARENT,
    LEAF_AGAIN,
    PARENT_BECOMING_LEAF,
];

impl LockPlan {
    /// This plan's index in [`PLANS`].
    pub fn index(&self) -> Option<u8> {
        PLANS
            .iter()
            .position(|p| {
                p.used == self.used
                    && p.unshared == self.unshared
                    && p.check_unshared == self.check_unshared
                    && p.check_used == self.check_used
            })
            .and_then(|i| u8::try_from(i).ok())
    }
}

/// A writable leaf: it reads and writes, and shares neither writing nor
/// resizing (what a running qemu guest disk holds).
pub const WRITER: LockPlan = LockPlan {
    used: &[PERM_READ, PERM_WRITE],
    unshared: &[PERM_WRITE, PERM_RESIZE],
    check_unshared: true,
    check_used: true,
};

/// A read-only open (a parent, or `-R`): it needs the bytes to stay as
/// they are, so nobody else may write or resize.
pub const READER: LockPlan = LockPlan {
    used: &[PERM_READ],
    unshared: &[PERM_WRITE, PERM_RESIZE],
    check_unshared: true,
    check_used: true,
};

/// A read cache (`open -r`) read as the parent of an `-e` clone: it only
/// reads, and refuses nothing, because the cache's own worker keeps
/// writing it (fills). That is safe for the clone: a fill only turns a
/// missing sector present after its data is durable, and the clone reads
/// a sector from the cache only where it saw it present (see
/// `crate::xapi::cached_parent`). Everyone else is still kept out by the
/// cache worker's [`WRITER`] lock.
pub const CACHE_READER: LockPlan = LockPlan {
    used: &[PERM_READ],
    unshared: &[],
    check_unshared: false,
    check_used: true,
};

/// No locks (removing a file: the fd only proves which file it is).
pub const NONE: LockPlan = LockPlan {
    used: &[],
    unshared: &[],
    check_unshared: false,
    check_used: true,
};

/// The served leaf re-opened read-only to become the parent of an online
/// snapshot: the same bytes as [`READER`], taken while the worker's own
/// writable open still holds "I write". That holder is the only one there
/// can be (it refuses writing and resizing to everyone else), and it goes
/// away at the switch, so the check for users of what we refuse is
/// skipped; the bytes we take keep every later writer out.
pub const LEAF_BECOMING_PARENT: LockPlan = LockPlan {
    used: &[PERM_READ],
    unshared: &[PERM_WRITE, PERM_RESIZE],
    check_unshared: false,
    check_used: true,
};

/// The served leaf re-opened read-write for an online stream, which
/// rewrites its footers and serves it afterwards: the same bytes as
/// [`WRITER`], taken while the worker's own writable open holds them (the
/// only holder there can be, see [`LEAF_BECOMING_PARENT`]); so no check.
pub const LEAF_AGAIN: LockPlan = LockPlan {
    used: &[PERM_READ, PERM_WRITE],
    unshared: &[PERM_WRITE, PERM_RESIZE],
    check_unshared: false,
    check_used: false,
};

/// A served parent opened read-write for an online commit, to become the
/// leaf. Its worker's read-only open refuses writing to everyone, so that
/// refusal is not checked; that nobody else uses the parent is: no writer
/// here, and no other minor of this broker (the broker's table, checked
/// before). A reader outside the broker (say qemu) holding the same bytes
/// as the worker is not told apart.
pub const PARENT_BECOMING_LEAF: LockPlan = LockPlan {
    used: &[PERM_READ, PERM_WRITE],
    unshared: &[PERM_WRITE, PERM_RESIZE],
    check_unshared: true,
    check_used: false,
};

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: `struct flock` is plain integers; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = i16::try_from(kind).unwrap_or(0);
    fl.l_whence = 0; // SEEK_SET
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0; // required for OFD locks
    fl
}

/// Take a shared OFD lock on `byte`.
fn lock_shared(fd: BorrowedFd<'_>, byte: i64) -> Result<(), i32> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads a valid `struct flock` we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Whether someone else (another open file description) holds a lock on
/// `byte` that an exclusive lock would conflict with.
fn held_by_other(fd: BorrowedFd<'_>, byte: i64) -> Result<bool, i32> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and overwrites a `struct flock` we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(errno());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Why an image could not be locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockFailure {
    /// `fcntl` failed (a filesystem without lock support: `ENOLCK`...).
    Os(i32),
    /// Someone holds a conflicting lock on this byte.
    Conflict(i64),
}

/// Apply `plan` to `fd` (qemu's order: take ours, then check others').
/// On failure the caller closes the fd, which drops what was taken.
pub fn apply(fd: BorrowedFd<'_>, plan: LockPlan) -> Result<(), LockFailure> {
    for p in plan.used {
        lock_shared(fd, PERM_BASE + p).map_err(LockFailure::Os)?;
    }
    for p in plan.unshared {
        lock_shared(fd, SHARED_BASE + p).map_err(LockFailure::Os)?;
    }
    // Nobody may refuse us what we use...
    for p in plan.used.iter().filter(|_| plan.check_used) {
        if held_by_other(fd, SHARED_BASE + p).map_err(LockFailure::Os)? {
            return Err(LockFailure::Conflict(SHARED_BASE + p));
        }
    }
    // ...nor use what we refuse.
    for p in plan.unshared.iter().filter(|_| plan.check_unshared) {
        if held_by_other(fd, PERM_BASE + p).map_err(LockFailure::Os)? {
            return Err(LockFailure::Conflict(PERM_BASE + p));
        }
    }
    Ok(())
}

/// What a conflicting lock byte means, in words.
pub fn describe(byte: i64) -> &'static str {
    match byte {
        b if b == PERM_BASE + PERM_WRITE => "is writing it",
        b if b == PERM_BASE + PERM_RESIZE => "may resize it",
        b if b == SHARED_BASE + PERM_WRITE => "is using it and allows no other writer",
        b if b == SHARED_BASE + PERM_READ => "allows no other reader",
        _ => "holds a conflicting lock on it",
    }
}

/// A process holding an OFD lock on the image (from `/proc/PID/fdinfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)
    }
}

/// `MAJ:MIN:INO` as `/proc/locks` and fdinfo print it (hex device).
fn lock_id(dev: u64, ino: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major:02x}:{minor:02x}:{ino}")
}

/// Most fdinfo files read when looking for a holder (the search only runs
/// on a refusal, but a host may have many fds).
const MAX_FDINFO: usize = 200_000;

/// Processes (other than us) with an fd on file `(dev, ino)` that holds a
/// lock covering `byte`. OFD locks report no pid (`F_OFD_GETLK` and
/// `/proc/locks` say -1), but each fd's fdinfo lists the locks on it.
pub fn holders(dev: u64, ino: u64, byte: i64) -> Vec<Holder> {
    let id = lock_id(dev, ino);
    let me = std::process::id();
    let mut out: Vec<Holder> = Vec::new();
    let mut budget = MAX_FDINFO;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || out.iter().any(|h| h.pid == pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if budget == 0 {
                return out;
            }
            budget -= 1;
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info.lines().any(|l| lock_line_covers(l, &id, byte)) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                out.push(Holder { pid, comm });
                break;
            }
        }
        if out.len() >= 4 {
            break;
        }
    }
    out
}

/// `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101`
fn lock_line_covers(line: &str, id: &str, byte: i64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let Some(pos) = f.iter().position(|x| *x == id) else {
        return false;
    };
    let start = f.get(pos + 1).and_then(|s| s.parse::<i64>().ok());
    let end = f.get(pos + 2).map(|s| {
        if *s == "EOF" {
            i64::MAX
        } else {
            s.parse::<i64>().unwrap_or(-1)
        }
    });
    matches!((start, end), (Some(s), Some(e)) if s <= byte && byte <= e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn open(p: &std::path::Path, w: bool) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(w)
            .open(p)
            .unwrap()
    }

    #[test]
    fn locks_one_writer_many_readers_and_no_writer_beside_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        let w1 = open(&p, true);
        apply(w1.as_fd(), WRITER).unwrap();
        // A second writer and a reader are refused while it holds.
        let w2 = open(&p, true);
        assert_eq!(
            apply(w2.as_fd(), WRITER),
            Err(LockFailure::Conflict(SHARED_BASE + PERM_WRITE))
        );
        drop(w2);
        let r = open(&p, false);
        assert_eq!(
            apply(r.as_fd(), READER),
            Err(LockFailure::Conflict(PERM_BASE + PERM_WRITE))
        );
        drop(r);
        // The lock lives on the open file description: a dup keeps it.
        let dup = w1.try_clone().unwrap();
        drop(w1);
        assert!(apply(open(&p, true).as_fd(), WRITER).is_err());
        drop(dup);
        // Readers share, and keep writers out.
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        apply(r1.as_fd(), READER).unwrap();
        apply(r2.as_fd(), READER).unwrap();
        assert_eq!(
            apply(open(&p, true).as_fd(), WRITER),
            Err(LockFailure::Conflict(SHARED_BASE + PERM_WRITE))
        );
    }

    #[test]
    fn locks_holder_is_found_through_fdinfo() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        // A child process holds the lock on an fd it inherited.
        let f = open(&p, true);
        apply(f.as_fd(), WRITER).unwrap();
        let st = tapjail_common::sys::fstat(f.as_fd()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(f))
            .spawn()
            .unwrap();
        // Until it execs, the forked child carries this thread's name:
        // wait for the exec (its comm turns to "sleep"), not for a time.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            assert!(std::time::Instant::now() < deadline, "sleep never ran");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let h = holders(st.dev, st.ino, SHARED_BASE + PERM_WRITE);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            h,
            vec![Holder {
                pid: child.id(),
                comm: "sleep".into()
            }]
        );
        assert!(lock_line_covers(
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:12 100 EOF",
            "fe:00:12",
            201
        ));
        assert!(!lock_line_covers(
            "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:12 100 101",
            "fe:00:12",
            201
        ));
    }
}
