//! Small wrappers over the syscalls the broker needs, each doing one thing
//! and written once (the device backends use them too). They go through
//! `rustix` (no `unsafe` here); what must run in a forked child before
//! `exec` lives in the binary's `supervisor/process.rs`, the open helper's
//! child in `image_open/helper.rs`, signal masks in
//! `tapjail_common::signals`. Opening beneath a root is
//! `tapjail_common::sys::open_beneath`.

use rustix::process::{Pid, PidfdFlags, Signal, WaitIdOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use tapjail_policy::PeerCred;

/// The peer's identity as the kernel recorded it at `connect()`.
pub fn peer_cred(sock: &UnixStream) -> io::Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(sock)?;
    Ok(PeerCred {
        pid: u32::try_from(c.pid.as_raw_nonzero().get()).unwrap_or(0),
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let raw = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let pid = Pid::from_raw(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// SIGKILL through a pidfd: never hits a recycled pid.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    match rustix::process::pidfd_send_signal(pidfd, Signal::KILL) {
        Ok(()) => Ok(()),
        // Already exited (maybe not yet reaped): nothing to kill.
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A pidfd of a process that has exited and been reaped: a stand-in for a
/// worker that is gone, through which no signal can reach anyone (a pidfd
/// names its process, never a later one with the same pid).
pub fn reaped_pidfd() -> io::Result<OwnedFd> {
    let mut child = std::process::Command::new("/bin/true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let fd = pidfd_open(child.id());
    child.wait()?;
    fd
}

/// Kill our child and wait for it, for workers that never made it into
/// the broker's tables (so nobody else would reap them).
pub fn kill_and_reap(pidfd: BorrowedFd<'_>) {
    let _ = pidfd_kill(pidfd);
    let _ = rustix::process::waitid(rustix::process::WaitId::PidFd(pidfd), WaitIdOptions::EXITED);
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// A process this broker adopted (not its child): it is gone, but only
    /// its parent (init) learns how.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with status {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            Exit::Unknown => write!(
                f,
                "exited (how is unknown: adopted, not this broker's child)"
            ),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSYS => "SIGSYS: seccomp violation",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// Reap our child behind `pidfd` if it has exited; `None` if it runs.
pub fn try_reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<Exit>> {
    let st = match rustix::process::waitid(
        rustix::process::WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(st) => st,
        // Not our child (an adopted worker): its pidfd polls readable
        // once it has exited; init reaps it.
        Err(rustix::io::Errno::CHILD) => {
            return Ok(pidfd_exited(pidfd, 0)?.then_some(Exit::Unknown))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(st.and_then(|s| {
        if let Some(sig) = s.terminating_signal() {
            Some(Exit::Signal(sig))
        } else {
            s.exit_status().map(Exit::Code)
        }
    }))
}

/// Whether the process behind `pidfd` has exited (for processes that are
/// not our children, such as a predecessor's orphaned workers).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A process's identity and confinement, from `/proc/PID/status` and
/// `/proc/PID/stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub no_new_privs: bool,
    pub seccomp: u32,
    /// Start time in clock ticks after boot (`stat` field 22): with the
    /// pid, names one process across pid reuse.
    pub start_time: u64,
    /// Inodes of its network and mount namespaces (0: unreadable).
    pub net_ns: u64,
    pub mnt_ns: u64,
    /// Owner of `/proc/PID/status`: the kernel gives a non-dumpable
    /// process's /proc files to root, a dumpable one's to its euid.
    pub proc_owner: u32,
}

pub fn proc_info(pid: u32) -> io::Result<ProcInfo> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut info = ProcInfo::default();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/status"));
    for line in status.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let val = val.trim();
        match key {
            "Uid" | "Gid" => {
                let ids: Vec<u32> = val
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let ids: [u32; 4] = ids.try_into().map_err(|_| bad())?;
                if key == "Uid" {
                    info.uids = ids;
                } else {
                    info.gids = ids;
                }
            }
            "CapEff" => info.cap_eff = u64::from_str_radix(val, 16).map_err(|_| bad())?,
            "NoNewPrivs" => info.no_new_privs = val == "1",
            "Seccomp" => info.seccomp = val.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    info.start_time = proc_start_time(pid)?;
    info.net_ns = ns_inode(pid, "net");
    info.mnt_ns = ns_inode(pid, "mnt");
    info.proc_owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(format!("/proc/{pid}/status"))?);
    Ok(info)
}

/// The inode of `/proc/PID/ns/NAME`, which identifies the namespace; 0 if
/// it cannot be read.
pub fn ns_inode(pid: u32, name: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{name}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0)
}

pub fn proc_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' are fixed. starttime is field 22, i.e. the
    // 20th after the ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "stat starttime"))
}

/// Whether bytes are queued on `sock` (peeked, not consumed; never
/// blocks). A closed or quiet socket has none.
pub fn has_queued_data(sock: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(sock, &mut byte[..], flags), Ok((n, _)) if n > 0)
}

/// Take an exclusive, non-blocking `flock`; `Ok(false)` if someone holds it.
pub fn try_lock(fd: impl AsFd) -> io::Result<bool> {
    match rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the broker and its
/// workers (the phase lines compare a worker's times with the spawn's).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_info_reads_self() {
        let me = proc_info(std::process::id()).unwrap();
        assert_eq!(me.uids[0], rustix::process::getuid().as_raw());
        assert!(me.start_time > 0);
        assert_ne!(me.net_ns, 0);
        assert_ne!(me.mnt_ns, 0);
        assert_ne!(me.net_ns, me.mnt_ns);
    }

    #[test]
    // Reaped through the pidfd (try_reap), which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn pidfd_reaps_child_and_reports_signal() {
        let child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert_eq!(try_reap(fd.as_fd()).unwrap(), None);
        pidfd_kill(fd.as_fd()).unwrap();
        assert!(pidfd_exited(fd.as_fd(), 5000).unwrap());
        assert_eq!(
            try_reap(fd.as_fd()).unwrap(),
            Some(Exit::Signal(libc::SIGKILL))
        );
    }
}
