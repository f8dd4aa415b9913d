//! `tap-broker --open-helper`: the opener process ([`super::opener`]).
//!
//! Started by the broker with its request socket on fd 3 and nothing
//! else. For each request (a [`super::wire`] plan and the socket the
//! helper answers on) it forks a helper that runs [`super::helper`]'s
//! child code, and answers the broker with the helper's pidfd. It never
//! changes its own credentials and never opens a path; it keeps only the
//! two capabilities a helper needs to take a tenant's ids, and exits when
//! the broker's end of its socket closes (the broker exited).

use super::helper;
use super::wire;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

/// The request socket (`tapjail_broker::spawn::CONTROL_FD`).
const SOCK: i32 = tapjail_broker::spawn::CONTROL_FD;

/// What the opener and its helpers keep: a helper takes the tenant's
/// filesystem ids (`setgroups`, `setfsgid`: CAP_SETGID; `setfsuid`:
/// CAP_SETUID) and then opens with her permissions alone, so nothing
/// else is needed: no DAC override, no mount, no ptrace.
const KEEP: u32 = 1 << CAP_SETGID | 1 << CAP_SETUID;
/// `<linux/capability.h>`'s numbers.
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// Keep only [`KEEP`], no new privileges, not dumpable (helpers hold
/// tenants' files for a moment).
fn drop_privileges() -> io::Result<()> {
    tapjail_broker::self_confine::keep_only_capabilities(KEEP)
}

/// Serve until the broker hangs up.
pub fn main() -> ExitCode {
    if let Err(e) = drop_privileges() {
        tracing::error!("tap-broker --open-helper: dropping privileges: {e}");
        return ExitCode::FAILURE;
    }
    // No parent-death signal: it follows the thread that started us,
    // which may be a client's thread that ends long before the broker.
    // The broker's end of the socket closes when the broker exits, and
    // that ends us.
    // SAFETY: signal/close_range take integers only.
    unsafe {
        // Helpers are reaped by the kernel; the broker watches them
        // through their pidfds.
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::syscall(libc::SYS_close_range, (SOCK + 1) as u32, u32::MAX, 0u32);
    }
    // SAFETY: fd 3 is the socket the broker set up for us (spawn's
    // control fd); nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(SOCK) };
    let me = std::process::id();
    let mut buf = vec![0u8; wire::MAX_REQUEST + 1];
    loop {
        let (n, answer) = match receive(sock.as_fd(), &mut buf) {
            Ok(Some(x)) => x,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("tap-broker --open-helper: {e}");
                return ExitCode::FAILURE;
            }
        };
        let reply = match (answer, buf.get(..n).map(wire::decode)) {
            (Some(answer), Some(Ok(req))) => fork_helper(&req, answer.as_fd(), me),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        if let Err(e) = send(sock.as_fd(), reply) {
            tracing::error!("tap-broker --open-helper: answering the broker: {e}");
            return ExitCode::FAILURE;
        }
    }
}

/// A request: its length and the answer socket (exactly one fd, or none
/// when the message carried anything else). `None` at end of file.
fn receive(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    loop {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut cmsg = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let r = match rustix::net::recvmsg(
            sock,
            &mut [io::IoSliceMut::new(buf)],
            &mut cmsg,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in cmsg.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if r.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        let truncated = r.flags.contains(rustix::net::ReturnFlags::TRUNC)
            || r.flags.contains(rustix::net::ReturnFlags::CTRUNC);
        let answer = match (fds.len(), truncated) {
            (1, false) => fds.pop(),
            _ => None,
        };
        return Ok(Some((r.bytes, answer)));
    }
}

/// Fork the helper for `req`; its pidfd, taken by the clone itself (the
/// kernel reaps helpers at once, so a pid looked up later could name
/// another process).
fn fork_helper(req: &wire::Request, answer: BorrowedFd<'_>, me: u32) -> io::Result<OwnedFd> {
    let plan = req.plan();
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone with fork semantics (no CLONE_VM, no new stack: the
    // child runs on a copy of this stack); CLONE_PIDFD stores the pidfd
    // through the parent_tid pointer, a live local. This process has one
    // thread, and the child only runs `helper::child`, which makes raw
    // syscalls on the copied `plan` and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PIDFD | libc::SIGCHLD,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        helper::child(&plan, answer, me);
    }
    // SAFETY: CLONE_PIDFD gave us this new fd; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// Status 0 and the pidfd, or the errno alone.
fn send(sock: BorrowedFd<'_>, reply: io::Result<OwnedFd>) -> io::Result<()> {
    let (status, fd) = match reply {
        Ok(fd) => (0i32, Some(fd)),
        Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), None),
    };
    let bytes = status.to_ne_bytes();
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = rustix::net::SendAncillaryBuffer::new(&mut space);
    let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
    if !fds.is_empty() && !cmsg.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("cmsg buffer too small"));
    }
    rustix::net::sendmsg(
        sock,
        &[io::IoSlice::new(&bytes)],
        &mut cmsg,
        rustix::net::SendFlags::NOSIGNAL,
    )?;
    Ok(())
}
