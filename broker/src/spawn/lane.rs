//! Spawning from a thread with a small fd table of its own.
//!
//! A child made without `CLONE_FILES` gets a copy of the caller's fd
//! table (a reference taken on every open file), and `execve` then closes
//! every close-on-exec one again. The broker holds about ten fds per
//! attached disk, so with 1000 disks each worker spawn copied and closed
//! some 10 000 of them: it made `exec` the largest step of a worker's
//! start, and one that grew with every disk.
//!
//! The lane is one broker thread that, when it starts, unshares its fd
//! table (`unshare(CLONE_FILES)` acts on the calling thread only) and
//! closes everything in it but stdio and its end of a socket pair. A spawn
//! sends the few fds the child needs over that socket (`SCM_RIGHTS`, into
//! the lane's table), the lane runs [`super::spawn`] with them, closes
//! them, and sends back the pidfd the clone made. The child's table is
//! then a copy of a handful of entries, whatever the broker holds.
//!
//! It is a thread of the broker, not a helper process: nothing else runs
//! with the broker's privileges, and it needs no more of them than the
//! spawn it replaces. Spawns through it take turns (each is a clone and
//! an exec of a small table: well under a millisecond).

use super::{spawn, Child, Setup, SpawnError};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use tapjail_common::frame;

/// One spawn for the lane: everything but the fds, which come over the
/// socket in the order of [`fds_of`].
struct Job {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    setup: Setup,
    reply: mpsc::Sender<Result<u32, SpawnError>>,
}

struct Lane {
    jobs: mpsc::Sender<Job>,
    sock: UnixStream,
    /// The lane thread is gone: spawn from the calling thread from now on.
    gone: bool,
}

/// The fds a setup names, each once, in a fixed order.
fn fds_of(s: &Setup) -> Vec<RawFd> {
    let mut v: Vec<RawFd> = Vec::new();
    let named = s
        .cgroup_procs
        .into_iter()
        .chain(s.stdio.into_iter().flatten())
        .chain(s.control)
        .chain(s.root.into_iter().flatten());
    for fd in named {
        if !v.contains(&fd) {
            v.push(fd);
        }
    }
    v
}

/// `setup` with each fd replaced by its number in the lane's table.
fn remap(s: &Setup, from: &[RawFd], to: &[OwnedFd]) -> Setup {
    let map = |fd: RawFd| {
        from.iter()
            .position(|&f| f == fd)
            .and_then(|i| to.get(i))
            .map_or(-1, |f| f.as_raw_fd())
    };
    Setup {
        cgroup_procs: s.cgroup_procs.map(map),
        stdio: s.stdio.map(|fds| fds.map(map)),
        control: s.control.map(map),
        root: s.root.map(|fds| fds.map(map)),
        ..*s
    }
}

fn lane() -> Option<&'static Mutex<Lane>> {
    static LANE: OnceLock<Option<Mutex<Lane>>> = OnceLock::new();
    LANE.get_or_init(|| match start() {
        Ok(l) => Some(Mutex::new(l)),
        Err(e) => {
            tracing::warn!(
                "spawning from the requesting thread (slower with many disks attached): \
                 cannot start the spawn lane: {e}"
            );
            None
        }
    })
    .as_ref()
}

/// Set to `off`, the lane runs at the normal priority (the old way, a
/// baseline for `bench/control-plane.sh`; not a policy key).
pub const RT_ENV: &str = "TAPJAIL_LANE_RT";

/// Run the lane at `SCHED_FIFO` priority 1, with `SCHED_RESET_ON_FORK`
/// (a child it clones starts at the normal priority).
///
/// Why: while the tenants' I/O keeps every CPU busy, the lane's wake-up
/// for a create's spawn waited behind it (`fork_exec` under fio at 1000
/// disks 2.0-3.4 ms, against 1.2-1.5 raised, in three same-session
/// pairs; idle, no difference). It runs nothing but the fd
/// hand-over and a vfork-style clone, a fraction of a millisecond per
/// spawn, and never a tenant's input: the child it makes is reset to
/// the normal policy before its first instruction. Best effort: refused
/// (no CAP_SYS_NICE, no real-time runtime in the broker's cgroup), the
/// lane runs at the normal priority.
fn raise() {
    if std::env::var(RT_ENV).is_ok_and(|v| v == "off") {
        return;
    }
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is this thread; `param` is a valid sched_param that
    // outlives the call.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        tracing::debug!(
            "the spawn lane runs at the normal priority: {}",
            io::Error::last_os_error()
        );
    }
}

fn start() -> io::Result<Lane> {
    let (ours, theirs) = UnixStream::pair()?;
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new()
        .name("spawn-lane".into())
        .spawn(move || {
            let sock = match own_table(theirs) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            raise();
            serve(&sock, &queue);
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("the spawn lane thread died"))??;
    Ok(Lane {
        jobs,
        sock: ours,
        gone: false,
    })
}

/// Unshare this thread's fd table and empty it but for stdio and `sock`.
fn own_table(sock: UnixStream) -> io::Result<UnixStream> {
    // SAFETY: unshare takes flags only; CLONE_FILES affects this thread.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Our socket at 3, then everything above it closed: in this table only.
    let at = 3;
    // SAFETY: dup2 onto fd 3 of this thread's private table.
    if unsafe { libc::dup2(sock.as_raw_fd(), at) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The original is closed with the rest just below.
    std::mem::forget(sock);
    // SAFETY: close_range on this thread's private table; fds above 3 are
    // the broker's, copied at the unshare, and none is ours to keep.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, at + 1, u32::MAX, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd 3 was just made a duplicate of the socket, ours alone.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(at) };
    // The broker's fds are close-on-exec; this one must be too.
    rustix::io::fcntl_setfd(&sock, rustix::io::FdFlags::CLOEXEC)?;
    Ok(UnixStream::from(sock))
}

fn serve(sock: &UnixStream, queue: &mpsc::Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        let wanted = fds_of(&job.setup);
        let got = match frame::recv_on::<_, u32>(sock, 64) {
            Ok((n, fds)) if n as usize == wanted.len() && fds.len() == wanted.len() => fds,
            Ok((n, fds)) => {
                let e = io::Error::other(format!(
                    "the spawn lane got {} fds ({n} announced), not {}",
                    fds.len(),
                    wanted.len()
                ));
                let _ = job.reply.send(Err(SpawnError::Clone(e)));
                continue;
            }
            Err(e) => {
                let _ = job.reply.send(Err(SpawnError::Clone(io::Error::other(e))));
                continue;
            }
        };
        // Received fds take the lowest free numbers (4, 5, ...), which are
        // where the child's steps put its fds: moved up first, so no step
        // overwrites the source of a later one.
        let received = got;
        let moved: Result<Vec<OwnedFd>, _> = received
            .iter()
            .map(|f| rustix::io::fcntl_dupfd_cloexec(f, 10))
            .collect();
        drop(received);
        let got = match moved {
            Ok(high) => high,
            Err(e) => {
                let _ = job.reply.send(Err(SpawnError::Clone(e.into())));
                continue;
            }
        };
        let setup = remap(&job.setup, &wanted, &got);
        let args: Vec<&std::ffi::OsStr> = job.args.iter().map(|a| a.as_os_str()).collect();
        let env: Vec<(&str, &str)> = job
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let result = spawn(&job.program, &args, &env, setup);
        // The child has its copies (or failed): ours go now, before the
        // reply, so a log pipe's last write end is the worker's.
        drop(got);
        match result {
            Ok(child) => {
                let reply = match frame::send_on(sock, &child.pid, &[child.pidfd.as_fd()]) {
                    Ok(()) => Ok(child.pid),
                    Err(e) => {
                        // Nobody would know of this child: it goes.
                        crate::sys::kill_and_reap(child.pidfd.as_fd());
                        Err(SpawnError::Clone(io::Error::other(e)))
                    }
                };
                let _ = job.reply.send(reply);
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
}

/// [`super::spawn`] from the lane: the same steps and result, with a child
/// that starts from a copy of a handful of fds. Falls back to spawning
/// from the calling thread if the lane cannot start.
pub fn spawn_lean(
    program: &std::path::Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    setup: Setup,
) -> Result<Child, SpawnError> {
    let Some(lane) = lane() else {
        return spawn(program, args, env, setup);
    };
    let mut lane = lane.lock().unwrap_or_else(|p| p.into_inner());
    if lane.gone {
        return spawn(program, args, env, setup);
    }
    let (reply, answer) = mpsc::channel();
    let wanted = fds_of(&setup);
    // SAFETY: the caller's setup names fds it keeps open for this call.
    let fds: Vec<BorrowedFd<'_>> = wanted
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    let job = Job {
        program: program.to_path_buf(),
        args: args.iter().map(|a| a.to_os_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        setup,
        reply,
    };
    let broken = |what: String| SpawnError::Clone(io::Error::other(what));
    // The fds first: if they cannot be sent, the lane has nothing queued.
    let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    frame::send_on(&lane.sock, &count, &fds)
        .map_err(|e| broken(format!("handing fds to the spawn lane: {e}")))?;
    if lane.jobs.send(job).is_err() {
        tracing::warn!("the spawn lane thread is gone; spawning from the requesting thread");
        lane.gone = true;
        return spawn(program, args, env, setup);
    }
    let pid = answer
        .recv()
        .map_err(|_| broken("the spawn lane thread died mid-spawn".into()))??;
    match frame::recv_on::<_, u32>(&lane.sock, 64) {
        Ok((said, mut got)) if said == pid && got.len() == 1 => {
            let pidfd = got.pop().expect("one fd");
            Ok(Child { pid, pidfd })
        }
        other => {
            // The child runs, but its pidfd did not arrive: it goes (the
            // broker reaps only children it knows, so the pid is still
            // this child's).
            if let Ok(pidfd) = crate::sys::pidfd_open(pid) {
                crate::sys::kill_and_reap(pidfd.as_fd());
            }
            Err(broken(format!(
                "the spawn lane's pidfd reply for {pid}: {}",
                match other {
                    Ok((said, got)) => format!("pid {said} with {} fds", got.len()),
                    Err(e) => e.to_string(),
                }
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wait for `child` to exit; its exit status.
    fn exit_status(child: &Child) -> Option<i32> {
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(child.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap()
        .unwrap()
        .exit_status()
    }

    fn open_fds_of(pid: u32) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The child sees the fds its setup names and no other, though this
    /// process holds 200 more that are not even close-on-exec (a spawn
    /// from this thread would pass every one on); it is reaped through the
    /// pidfd the lane made.
    #[test]
    fn a_lane_child_starts_with_only_its_own_fds() {
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD (no close-on-exec) of an fd we own; each result
        // is owned by the OwnedFd made of it.
        let many: Vec<OwnedFd> = (0..200)
            .map(|_| unsafe {
                let fd = libc::fcntl(null.as_raw_fd(), libc::F_DUPFD, 10);
                assert!(fd >= 10);
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            })
            .collect();
        let (_ours, theirs) = UnixStream::pair().unwrap();
        let (in_r, mut in_w) = std::io::pipe().unwrap();
        let (mut out_r, out_w) = std::io::pipe().unwrap();
        let child = spawn_lean(
            std::path::Path::new("/bin/cat"),
            &[],
            &[],
            Setup {
                stdio: Some([in_r.as_raw_fd(), out_w.as_raw_fd(), null.as_raw_fd()]),
                control: Some(theirs.as_raw_fd()),
                ..Setup::default()
            },
        )
        .unwrap();
        drop((in_r, out_w));
        // An echo through cat: it runs, so its exec (which closes the
        // close-on-exec fds after the spawn returns) is over.
        use std::io::{Read, Write};
        in_w.write_all(b"x").unwrap();
        let mut echo = [0u8; 1];
        out_r.read_exact(&mut echo).unwrap();
        let fds = open_fds_of(child.pid);
        rustix::process::pidfd_send_signal(&child.pidfd, rustix::process::Signal::KILL).unwrap();
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(child.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap();
        assert_eq!(fds, ["0", "1", "2", "3"], "{fds:?}");
        drop(many);
    }

    /// Every fd lands where the setup says, whatever numbers the lane got
    /// them at: with nothing else to pass, the root fds arrive at 4 and 5,
    /// the very numbers they are moved to (a dup2 onto itself would leave
    /// close-on-exec set and the exec would close them).
    #[test]
    fn a_lane_child_gets_each_fd_at_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let named = |n: &str| std::fs::File::create(dir.path().join(n)).unwrap();
        let (ns, root) = (named("ns"), named("root"));
        let child = spawn_lean(
            std::path::Path::new("/bin/sleep"),
            &[std::ffi::OsStr::new("30")],
            &[],
            Setup {
                root: Some([ns.as_raw_fd(), root.as_raw_fd()]),
                cloexec_rest: true,
                ..Setup::default()
            },
        )
        .unwrap();
        // The exec names the task after closing close-on-exec fds: once
        // it is "sleep", its fds are final.
        let comm = format!("/proc/{}/comm", child.pid);
        while std::fs::read_to_string(&comm).unwrap().trim() != "sleep" {
            std::thread::yield_now();
        }
        let at = |fd: u32| std::fs::read_link(format!("/proc/{}/fd/{fd}", child.pid)).ok();
        let (four, five) = (at(4), at(5));
        crate::sys::kill_and_reap(child.pidfd.as_fd());
        assert_eq!(four, Some(dir.path().join("ns")));
        assert_eq!(five, Some(dir.path().join("root")));
    }

    /// A failed step is reported as from a direct spawn, and the lane goes
    /// on serving.
    #[test]
    fn a_failing_lane_spawn_is_reported_and_the_lane_goes_on() {
        let e = spawn_lean(
            std::path::Path::new("/nonexistent/tapdisk"),
            &[],
            &[],
            Setup::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("execve"), "{e}");
        let child = spawn_lean(
            std::path::Path::new("/bin/true"),
            &[],
            &[],
            Setup::default(),
        )
        .unwrap();
        assert_eq!(exit_status(&child), Some(0));
    }

    /// The lane runs at SCHED_FIFO (as root); a child it clones starts at
    /// SCHED_OTHER (field 41 of its stat, read by the shell itself before
    /// it forks anything), so no worker starts raised.
    #[test]
    fn the_lane_is_raised_and_its_children_are_not() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "CI runs as root");
            return;
        }
        let (r, w) = std::io::pipe().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let script = "read -r line < /proc/$$/stat; set -- $line; echo \"${41}\"";
        let child = spawn_lean(
            std::path::Path::new("/bin/sh"),
            &[std::ffi::OsStr::new("-c"), std::ffi::OsStr::new(script)],
            &[],
            Setup {
                stdio: Some([null.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()]),
                ..Setup::default()
            },
        )
        .unwrap();
        drop(w);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { r }, &mut out).unwrap();
        assert_eq!(exit_status(&child), Some(0));
        assert_eq!(out.trim(), "0", "a lane child starts at SCHED_OTHER");
        // The lane thread itself (started by the spawn above).
        let lane_policy = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let tid = t.ok()?.file_name().into_string().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
                (comm.trim() == "spawn-lane").then_some(tid.parse::<i32>().ok()?)
            })
            // SAFETY: sched_getscheduler takes a tid and no memory.
            .map(|tid| unsafe { libc::sched_getscheduler(tid) } & !libc::SCHED_RESET_ON_FORK)
            .next();
        assert_eq!(lane_policy, Some(libc::SCHED_FIFO), "the lane runs raised");
    }
}
