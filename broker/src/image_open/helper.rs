//! The open helper: a forked child (of the opener, [`super::opener`], or
//! of the broker when no opener runs) that opens one image with
//! the tenant's filesystem credentials, checks it and locks it, and sends
//! the fd back over a socketpair. A separate process, so that:
//!
//! - its credentials (`setfsuid`/`setfsgid`/`setgroups`) never touch the
//!   broker's threads;
//! - an open that hangs (a FUSE or NFS server that never answers) is
//!   ended with SIGKILL at the deadline, and nothing piles up in the
//!   broker (a thread stuck in the kernel could not be ended at all).
//!
//! After `fork` only async-signal-safe code may run in the child (other
//! threads may have held malloc's lock): the child makes raw syscalls on
//! buffers prepared by the parent and never allocates.

use super::locks::{self, LockFailure, LockPlan};
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};
use tapjail_common::sys::{BeneathError, FileStat};

/// What the child is to do, prepared before `fork`.
#[derive(Debug)]
pub struct Plan<'a> {
    pub root: &'a CStr,
    pub relative: &'a CStr,
    pub writable: bool,
    pub uid: u32,
    pub gid: u32,
    /// An empty slice: any owner, any link count (a shared root).
    pub owners: &'a [u32],
    pub lock: LockPlan,
    pub action: Action<'a>,
}

/// What the helper does with the path.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Open an existing file.
    Open,
    /// Create a new file (`O_CREAT|O_EXCL`, read-write).
    Create,
    /// Open read-write, creating the file (0600) if it is missing: a CBT
    /// log of `tap-ctl cbt start`, which may already exist.
    OpenOrCreate,
    /// Unlink `base` in the directory `dir` (relative to the root, `.`
    /// for the root itself) if it is still the file `id` (dev, inode):
    /// an online snapshot's child that was never used. The answer carries
    /// the file, opened read-only before the unlink.
    Remove {
        dir: &'a CStr,
        base: &'a CStr,
        id: (u64, u64),
    },
}

/// How the child's attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Switching to the tenant's credentials failed.
    Creds(i32),
    /// Opening the root directory failed.
    Root(i32),
    /// Opening the file beneath the root failed.
    Open(BeneathError),
    /// The file belongs to someone else.
    NotOwned(FileStat),
    /// The file has more than one link.
    Linked(FileStat),
    /// Locking failed or conflicts.
    Lock(LockFailure, FileStat),
}

/// Most helpers left unreaped (stuck in the kernel even after SIGKILL)
/// before opens are refused, so they cannot accumulate without bound.
const MAX_STUCK: usize = 8;
static STUCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Helpers killed but not yet reaped.
#[cfg(test)]
pub fn stuck() -> usize {
    STUCK.load(std::sync::atomic::Ordering::SeqCst)
}

/// Why the helper gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("opening it took longer than {0:?}")]
    Deadline(Duration),
    #[error("{MAX_STUCK} earlier opens are stuck in the kernel; refusing more until they end")]
    TooManyStuck,
    #[error("open helper: {0}")]
    Sys(#[from] std::io::Error),
    #[error("open helper: malformed answer")]
    Malformed,
}

/// Result message, fixed size: [kind, code, dev, ino, uid, gid, nlink, mode].
const WORDS: usize = 8;
const MSG: usize = WORDS * 8;

const K_OK: u64 = 0;
const K_CREDS: u64 = 1;
const K_ROOT: u64 = 2;
const K_OPEN: u64 = 3;
const K_NOTREG: u64 = 4;
const K_NOTOWNED: u64 = 5;
const K_LINKED: u64 = 6;
const K_LOCK_OS: u64 = 7;
const K_LOCK_CONFLICT: u64 = 8;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Run `plan` in a helper process, waiting at most `deadline`.
pub fn run(
    plan: &Plan<'_>,
    deadline: Duration,
) -> Result<Result<(OwnedFd, FileStat), Outcome>, HelperError> {
    if STUCK.load(std::sync::atomic::Ordering::SeqCst) >= MAX_STUCK {
        return Err(HelperError::TooManyStuck);
    }
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    // The opener forks the helper when it runs (cheap: a small process);
    // otherwise the broker forks it (copying the broker).
    let pidfd = match super::opener::launch(plan, theirs.as_fd()) {
        Some(pidfd) => pidfd,
        None => fork_here(plan, theirs.as_fd())?,
    };
    drop(theirs);
    tapjail_broker::phases::lap("open_fork");
    let start = Instant::now();
    let answered = wait_readable(ours.as_fd(), deadline)?;
    if !answered {
        let _ = crate::sys::pidfd_kill(pidfd.as_fd());
        reap_bounded(pidfd);
        return Err(HelperError::Deadline(deadline));
    }
    let got = receive(ours.as_fd());
    tapjail_broker::phases::lap("open_answer");
    // It exits right after sending; closing its copy of a FUSE file can
    // still wait on the server, so the reap is bounded too.
    let left = deadline.saturating_sub(start.elapsed());
    if crate::sys::pidfd_exited(pidfd.as_fd(), millis(left)).unwrap_or(false) {
        let _ = crate::sys::try_reap(pidfd.as_fd());
    } else {
        let _ = crate::sys::pidfd_kill(pidfd.as_fd());
        reap_bounded(pidfd);
    }
    tapjail_broker::phases::lap("open_reap");
    got
}

/// Fork the helper from the broker itself; its pidfd.
fn fork_here(plan: &Plan<'_>, answer: BorrowedFd<'_>) -> Result<OwnedFd, HelperError> {
    let parent = std::process::id();
    // SAFETY: fork has no memory-safety preconditions; in the child we
    // only call `child`, which makes raw syscalls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        child(plan, answer, parent);
    }
    let pid = u32::try_from(pid).map_err(|_| HelperError::Malformed)?;
    // Our unreaped child: the pid cannot name another process yet.
    Ok(crate::sys::pidfd_open(pid)?)
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

fn wait_readable(fd: BorrowedFd<'_>, limit: Duration) -> std::io::Result<bool> {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reap a killed helper (ours, or the opener's, which the kernel reaps:
/// then "reaped" means it has exited); if SIGKILL does not end it within a
/// second (a task in uninterruptible sleep), a thread waits for it and it
/// counts against [`MAX_STUCK`] until then.
fn reap_bounded(pidfd: OwnedFd) {
    if crate::sys::pidfd_exited(pidfd.as_fd(), 1000).unwrap_or(false) {
        let _ = crate::sys::try_reap(pidfd.as_fd());
        return;
    }
    STUCK.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("open-helper-reap".into())
        .spawn(move || {
            loop {
                let _ = crate::sys::pidfd_kill(pidfd.as_fd());
                match crate::sys::pidfd_exited(pidfd.as_fd(), 1000) {
                    Ok(false) => continue,
                    Ok(true) | Err(_) => break,
                }
            }
            let _ = crate::sys::try_reap(pidfd.as_fd());
            STUCK.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    if spawned.is_err() {
        tracing::warn!("cannot start a thread to reap a stuck open helper");
    }
}

fn receive(sock: BorrowedFd<'_>) -> Result<Result<(OwnedFd, FileStat), Outcome>, HelperError> {
    let mut buf = [0u8; MSG];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let r = rustix::net::recvmsg(
        sock,
        &mut iov,
        &mut cmsg,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in cmsg.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if r.bytes != MSG || r.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(HelperError::Malformed);
    }
    let mut w = [0u64; WORDS];
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        if let Some(slot) = w.get_mut(i) {
            *slot = u64::from_ne_bytes(b);
        }
    }
    let st = FileStat {
        dev: w[2],
        ino: w[3],
        uid: u32::try_from(w[4]).unwrap_or(u32::MAX),
        gid: u32::try_from(w[5]).unwrap_or(u32::MAX),
        nlink: w[6],
        mode: u32::try_from(w[7]).unwrap_or(0),
    };
    let code = i32::try_from(w[1]).unwrap_or(libc::EIO);
    let outcome = match w[0] {
        K_OK => {
            let mut it = fds.into_iter();
            return match (it.next(), it.next()) {
                (Some(fd), None) => Ok(Ok((fd, st))),
                _ => Err(HelperError::Malformed),
            };
        }
        K_CREDS => Outcome::Creds(code),
        K_ROOT => Outcome::Root(code),
        K_OPEN => Outcome::Open(BeneathError::Os(code)),
        K_NOTREG => Outcome::Open(BeneathError::NotRegular),
        K_NOTOWNED => Outcome::NotOwned(st),
        K_LINKED => Outcome::Linked(st),
        K_LOCK_OS => Outcome::Lock(LockFailure::Os(code), st),
        K_LOCK_CONFLICT => Outcome::Lock(LockFailure::Conflict(i64::from(code)), st),
        _ => return Err(HelperError::Malformed),
    };
    Ok(Err(outcome))
}

/// The child: never returns. Raw syscalls only, no allocation, no panic
/// path (every fallible step ends in a report or `_exit`).
pub(super) fn child(plan: &Plan<'_>, sock: BorrowedFd<'_>, parent: u32) -> ! {
    // Die with the broker, and keep nothing of it but the answer socket.
    // SAFETY: prctl/getppid/close_range take integers only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if u32::try_from(libc::getppid()).ok() != Some(parent) {
            libc::_exit(1);
        }
    }
    let keep = sock.as_raw_fd();
    close_all_but(keep);
    let (report, fd) = match attempt(plan) {
        Ok((fd, st)) => (words(K_OK, 0, &st), Some(fd)),
        Err((kind, code, st)) => (words(kind, code, &st), None),
    };
    let mut bytes = [0u8; MSG];
    for (i, w) in report.iter().enumerate() {
        if let Some(dst) = bytes.get_mut(i * 8..i * 8 + 8) {
            dst.copy_from_slice(&w.to_ne_bytes());
        }
    }
    send(keep, &bytes, fd.as_ref().map(|f| f.as_raw_fd()));
    // SAFETY: _exit ends the process without running atexit handlers or
    // destructors (which would be unsafe after fork).
    unsafe { libc::_exit(0) }
}

fn close_all_but(keep: RawFd) {
    // SAFETY: close_range on fd numbers; only closes this child's table.
    unsafe {
        if keep > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
    }
}

type Failure = (u64, i64, FileStat);

fn attempt(plan: &Plan<'_>) -> Result<(OwnedFd, FileStat), Failure> {
    let none = FileStat::default();
    become_tenant(plan.uid, plan.gid).map_err(|e| (K_CREDS, i64::from(e), none))?;
    let dir = tapjail_common::sys::open_dir_nofollow(plan.root)
        .map_err(|e| (K_ROOT, i64::from(e), none))?;
    let beneath_err = |e: BeneathError| match e {
        BeneathError::Os(n) => (K_OPEN, i64::from(n), none),
        BeneathError::NotRegular => (K_NOTREG, 0, none),
    };
    let (fd, st) = match plan.action {
        Action::Open => {
            tapjail_common::sys::open_beneath(dir.as_fd(), plan.relative, plan.writable)
                .map_err(beneath_err)?
        }
        Action::Create => {
            tapjail_common::sys::create_beneath(dir.as_fd(), plan.relative).map_err(beneath_err)?
        }
        Action::OpenOrCreate => {
            tapjail_common::sys::open_or_create_beneath(dir.as_fd(), plan.relative)
                .map_err(beneath_err)?
        }
        Action::Remove { dir: sub, base, id } => {
            let (fd, st) = tapjail_common::sys::open_beneath(dir.as_fd(), plan.relative, false)
                .map_err(beneath_err)?;
            if (st.dev, st.ino) != id {
                return Err((K_OPEN, i64::from(libc::ESTALE), st));
            }
            let parent = tapjail_common::sys::open_dir_beneath(dir.as_fd(), sub)
                .map_err(|e| (K_OPEN, i64::from(e), st))?;
            // SAFETY: unlinkat on a directory fd we own and a NUL-terminated name.
            if unsafe { libc::unlinkat(parent.as_raw_fd(), base.as_ptr(), 0) } != 0 {
                return Err((K_OPEN, i64::from(errno()), st));
            }
            return Ok((fd, st));
        }
    };
    if !plan.owners.is_empty() {
        if !plan.owners.contains(&st.uid) {
            return Err((K_NOTOWNED, 0, st));
        }
        if st.nlink != 1 {
            return Err((K_LINKED, 0, st));
        }
    }
    locks::apply(fd.as_fd(), plan.lock).map_err(|e| match e {
        LockFailure::Os(n) => (K_LOCK_OS, i64::from(n), st),
        LockFailure::Conflict(b) => (K_LOCK_CONFLICT, b, st),
    })?;
    Ok((fd, st))
}

/// Filesystem identity of the tenant: no supplementary groups, her gid,
/// her uid (a non-zero fsuid also drops the filesystem capabilities, so
/// permission checks apply to her). The child has one thread, so the raw
/// `setgroups` changes all of it.
fn become_tenant(uid: u32, gid: u32) -> Result<(), i32> {
    // SAFETY: setgroups with a count of 0 reads no memory.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) } != 0 {
        return Err(errno());
    }
    // SAFETY: setfsgid/setfsuid take integers; calling them again with
    // the same id returns the current one, which is how success shows.
    unsafe {
        libc::setfsgid(gid);
        if u32::try_from(libc::setfsgid(gid)).ok() != Some(gid) {
            return Err(libc::EPERM);
        }
        libc::setfsuid(uid);
        if u32::try_from(libc::setfsuid(uid)).ok() != Some(uid) {
            return Err(libc::EPERM);
        }
    }
    Ok(())
}

fn words(kind: u64, code: i64, st: &FileStat) -> [u64; WORDS] {
    [
        kind,
        u64::from_ne_bytes(code.to_ne_bytes()),
        st.dev,
        st.ino,
        u64::from(st.uid),
        u64::from(st.gid),
        st.nlink,
        u64::from(st.mode),
    ]
}

/// `sendmsg` of `bytes` with `fd` (if any) as SCM_RIGHTS, on the stack.
fn send(sock: RawFd, bytes: &[u8; MSG], fd: Option<RawFd>) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: MSG,
    };
    // Room for one cmsghdr with one int, aligned for cmsghdr.
    let mut space = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; we fill the fields we use.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
        let (space_len, len) = unsafe {
            (
                libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32),
                libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32),
            )
        };
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = space_len as usize;
        // SAFETY: msg_control points to `space` (32 bytes, enough for
        // CMSG_SPACE(4) = 24) which outlives these writes; CMSG_FIRSTHDR
        // returns a pointer inside it, CMSG_DATA a pointer to its payload.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                libc::_exit(2);
            }
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = len as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: msg and everything it points to live across the call.
    unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
}
