//! The opener: a small process (`tap-broker --open-helper`) started once,
//! which forks each open helper ([`super::helper`]) on the broker's behalf.
//!
//! Why: a helper forked from the broker copies the broker's page tables
//! and fd table, and the broker then pays copy-on-write faults while the
//! helper lives. At 1000 attached disks that was most of an image open's
//! 4 ms. The opener is a fresh exec with a few fds and pages, so its fork
//! is cheap, and the helper it forks runs exactly the code a broker-forked
//! helper runs: the tenant's filesystem credentials in a process of its
//! own (never in a broker thread), the answer sent straight to the broker
//! on the socket the broker made, and a pidfd of it handed to the broker,
//! which kills it at the deadline as before. The opener itself never
//! takes anyone's credentials and opens nothing.
//!
//! Without an opener (it could not be started, or died and cannot be
//! restarted) the broker forks the helper itself, as before: slower, same
//! rules.

use super::helper::Plan;
use super::wire;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The hidden flag that makes tap-broker run as the opener.
pub const FLAG: &str = "--open-helper";

/// How long the opener may take to fork a helper and answer; past it the
/// opener is taken for wedged, killed, and the broker forks itself.
const ANSWER: Duration = Duration::from_secs(2);

/// The running opener: our end of its request socket, and its pidfd.
#[derive(Debug)]
struct Opener {
    sock: OwnedFd,
    child: tapjail_broker::spawn::Child,
}

impl Drop for Opener {
    fn drop(&mut self) {
        tapjail_broker::sys::kill_and_reap(self.child.pidfd.as_fd());
    }
}

static OPENER: Mutex<Option<Opener>> = Mutex::new(None);
static EXE: OnceLock<PathBuf> = OnceLock::new();

/// Set to `off`, the broker starts no opener (the old way, as a baseline
/// for `bench/control-plane.sh`; a debug knob, not a policy key).
pub const ENV: &str = "TAPJAIL_OPENER";

/// Start the opener from `exe` (tap-broker's own executable). An error is
/// not fatal: opens then fork from the broker.
pub fn start(exe: &Path) -> io::Result<()> {
    if std::env::var(ENV).is_ok_and(|v| v == "off") {
        return Err(io::Error::other(format!("turned off by {ENV}=off")));
    }
    let _ = EXE.set(exe.to_path_buf());
    let o = launch_opener(exe)?;
    *lock() = Some(o);
    Ok(())
}

fn lock() -> std::sync::MutexGuard<'static, Option<Opener>> {
    OPENER.lock().unwrap_or_else(|e| e.into_inner())
}

fn launch_opener(exe: &Path) -> io::Result<Opener> {
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let setup = tapjail_broker::spawn::Setup {
        new_process_group: true,
        control: Some(theirs.as_raw_fd()),
        cloexec_rest: true,
        ..Default::default()
    };
    let child = tapjail_broker::spawn::spawn(exe, &[FLAG.as_ref()], &[], setup)
        .map_err(tapjail_broker::spawn::SpawnError::into_io)?;
    Ok(Opener { sock: ours, child })
}

/// Have the opener fork a helper for `plan` that answers on `answer`;
/// the helper's pidfd, or `None` when there is no working opener (the
/// caller then forks the helper itself).
pub fn launch(plan: &Plan<'_>, answer: BorrowedFd<'_>) -> Option<OwnedFd> {
    let request = wire::encode(plan).ok()?;
    let mut g = lock();
    if g.is_none() {
        // Died earlier: one restart per open that finds it gone.
        let exe = EXE.get()?;
        match launch_opener(exe) {
            Ok(o) => *g = Some(o),
            Err(e) => {
                tracing::warn!("cannot restart the image opener: {e}; forking open helpers");
                return None;
            }
        }
    }
    let o = g.as_ref()?;
    match exchange(o, &request, answer) {
        Ok(pidfd) => Some(pidfd),
        Err(e) => {
            tracing::warn!(
                pid = o.child.pid,
                "image opener {}: {e}; stopping it (the next open starts another)",
                o.child.pid
            );
            *g = None; // Drop kills and reaps it.
            None
        }
    }
}

/// One request and its answer: status 0 and the helper's pidfd, or an errno.
fn exchange(o: &Opener, request: &[u8], answer: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fds = [answer];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !cmsg.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("cmsg buffer too small"));
    }
    let sent = rustix::net::sendmsg(
        &o.sock,
        &[io::IoSlice::new(request)],
        &mut cmsg,
        rustix::net::SendFlags::NOSIGNAL,
    )?;
    if sent != request.len() {
        return Err(io::Error::other("short request"));
    }
    let mut polled = [rustix::event::PollFd::new(
        &o.sock,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: i64::try_from(ANSWER.as_secs()).unwrap_or(2),
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut polled, Some(&ts)) {
            Ok(0) => return Err(io::Error::other("no answer within 2 s")),
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut status = [0u8; 4];
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        &o.sock,
        &mut [io::IoSliceMut::new(&mut status)],
        &mut cmsg,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut got: Vec<OwnedFd> = Vec::new();
    for m in cmsg.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = m {
            got.extend(rights);
        }
    }
    if r.bytes == 0 {
        return Err(io::Error::other("it exited"));
    }
    if r.bytes != status.len() {
        return Err(io::Error::other("malformed answer"));
    }
    match (i32::from_ne_bytes(status), got.len()) {
        (0, 1) => got
            .pop()
            .ok_or_else(|| io::Error::other("malformed answer")),
        (0, _) => Err(io::Error::other("malformed answer")),
        (e, _) => Err(io::Error::from_raw_os_error(e)),
    }
}
