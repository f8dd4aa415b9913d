//! Starting a program from the broker without copying the broker.
//!
//! `fork` copies the caller's page tables and every mapping's metadata,
//! then `exec` throws the copy away: its cost grows with what the broker
//! holds (at 1000 attached disks, thousands of fds and a large heap), and
//! it is paid on every `create`. `clone(CLONE_VM | CLONE_VFORK)` (what
//! glibc's `posix_spawn` does) shares the address space instead: the
//! calling thread sleeps until the child has called `execve` or exited,
//! the child runs a short, fixed list of steps on a stack of its own, and
//! the cost is the same with 1 disk or 1000.
//!
//! Why not `posix_spawn` itself: it cannot set `RLIMIT_MEMLOCK` or enter a
//! cgroup in the child, and those must happen before the worker runs a
//! single instruction. Why not a pre-forked spawner process (crosvm's and
//! Firecracker's jailer style zygote): it would be one more long-lived
//! root process holding every worker's fds on their way, and each spawn
//! would cost two hops over a socket; a vfork-style clone is already
//! constant-time here. The fd table is the other thing a child copies:
//! [`spawn_lean`] runs the clone on a thread whose table holds only what
//! the child needs (see [`lane`]).
//!
//! The child shares the broker's memory, so it only makes raw syscalls on
//! data the parent prepared (no allocation, no locks, no Rust runtime),
//! and reports a failed step through two atomics the parent reads after
//! it wakes. Signals are blocked in the calling thread around the clone,
//! and the child resets every handled signal to its default before
//! unblocking, so no broker signal handler ever runs on the child's stack.

mod lane;
pub use lane::spawn_lean;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

/// The child's own stack: its steps are a few frames of plain syscalls.
const STACK: usize = 128 * 1024;
/// The fd the child's control socket is moved to.
pub const CONTROL_FD: RawFd = tapjail_common::worker_proto::CONTROL_FD;
/// The fd the child's mount namespace to join is moved to.
pub const ROOT_NS_FD: RawFd = tapjail_common::worker_proto::ROOT_NS_FD;
/// The fd the child's empty root directory is moved to.
pub const ROOT_DIR_FD: RawFd = tapjail_common::worker_proto::ROOT_DIR_FD;

/// What the child does before `execve`, in this order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    /// Write `0` to this `cgroup.procs` (moves the child into that cgroup).
    pub cgroup_procs: Option<RawFd>,
    /// Become the leader of a new process group.
    pub new_process_group: bool,
    /// dup2'd onto fds 0, 1, 2.
    pub stdio: Option<[RawFd; 3]>,
    /// dup2'd onto [`CONTROL_FD`].
    pub control: Option<RawFd>,
    /// A mount namespace and a directory in it, dup2'd onto
    /// [`ROOT_NS_FD`] and [`ROOT_DIR_FD`] (after `control`: neither may be
    /// [`CONTROL_FD`] or the other's target).
    pub root: Option<[RawFd; 2]>,
    /// RLIMIT_MEMLOCK, soft and hard (bytes).
    pub memlock: Option<u64>,
    /// Mark every fd above the ones set up close-on-exec (they are
    /// already, as std and rustix open them; this catches any that is not).
    pub cloexec_rest: bool,
}

/// A started child: its pid and a pidfd naming exactly it (taken by the
/// clone itself, so no pid reuse can come between).
#[derive(Debug)]
pub struct Child {
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// Which step failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("bad argument (NUL byte) in {0:?}")]
    Nul(String),
    #[error("allocating the child's stack: {0}")]
    Stack(#[source] io::Error),
    #[error("clone: {0}")]
    Clone(#[source] io::Error),
    #[error("in the new process, {step}: {source}")]
    Child {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// The OS error underneath, for callers that report an `io::Error`.
    pub fn into_io(self) -> io::Error {
        match self {
            SpawnError::Stack(e) | SpawnError::Clone(e) => e,
            SpawnError::Child { step, source } => {
                io::Error::new(source.kind(), format!("{step}: {source}"))
            }
            e @ SpawnError::Nul(_) => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        }
    }
}

/// The steps, numbered for the failure report (0 = none failed).
const STEPS: [&str; 11] = [
    "",
    "resetting signal handlers",
    "setpgid",
    "entering the cgroup",
    "dup2 of stdio",
    "moving the control socket to fd 3",
    "setrlimit(RLIMIT_MEMLOCK)",
    "close_range(CLOEXEC)",
    "chdir /",
    "execve",
    "moving the empty root's fds to fds 4 and 5",
];

/// Everything the child reads, prepared by the parent; and where it says
/// which step failed.
struct Ctx {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    root: *const libc::c_char,
    setup: Setup,
    step: AtomicU8,
    errno: AtomicI32,
}

/// Start `program` with `args` and exactly the environment `env`, in `/`,
/// after `setup`.
pub fn spawn(
    program: &Path,
    args: &[&OsStr],
    env: &[(&str, &str)],
    setup: Setup,
) -> Result<Child, SpawnError> {
    let nul = |what: &[u8]| SpawnError::Nul(String::from_utf8_lossy(what).into_owned());
    // The child starts in `/`: a relative program path is resolved here.
    let program = std::path::absolute(program)
        .map_err(|e| SpawnError::Nul(format!("{}: {e}", program.display())))?;
    let path = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| nul(program.as_os_str().as_bytes()))?;
    let mut argv_owned = vec![path.clone()];
    for a in args {
        argv_owned.push(CString::new(a.as_bytes()).map_err(|_| nul(a.as_bytes()))?);
    }
    let mut env_owned = Vec::with_capacity(env.len());
    for (k, v) in env {
        let kv = format!("{k}={v}");
        env_owned.push(CString::new(kv.as_bytes()).map_err(|_| nul(kv.as_bytes()))?);
    }
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let ctx = Ctx {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        root: c"/".as_ptr(),
        setup,
        step: AtomicU8::new(0),
        errno: AtomicI32::new(0),
    };
    let stack = Stack::new().map_err(SpawnError::Stack)?;
    let mut pidfd: libc::c_int = -1;
    let pid = {
        let _mask = BlockAll::new().map_err(SpawnError::Clone)?;
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
        // SAFETY: `child` runs on `stack` (ours until the child has exec'd
        // or exited, which CLONE_VFORK waits for) and reads only `ctx`,
        // which outlives the call for the same reason; CLONE_PIDFD stores
        // the pidfd into `pidfd`, a valid out-pointer.
        unsafe {
            libc::clone(
                child,
                stack.top(),
                flags,
                std::ptr::from_ref(&ctx).cast_mut().cast(),
                &mut pidfd as *mut libc::c_int,
            )
        }
    };
    if pid < 0 {
        return Err(SpawnError::Clone(io::Error::last_os_error()));
    }
    // SAFETY: CLONE_PIDFD gave us this new fd (close-on-exec); we own it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let step = ctx.step.load(Ordering::Acquire);
    if step != 0 {
        // The child has exited (with 127): reap it.
        let _ = rustix::process::waitid(
            rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&pidfd)),
            rustix::process::WaitIdOptions::EXITED,
        );
        return Err(SpawnError::Child {
            step: STEPS.get(usize::from(step)).copied().unwrap_or("?"),
            source: io::Error::from_raw_os_error(ctx.errno.load(Ordering::Acquire)),
        });
    }
    Ok(Child {
        pid: u32::try_from(pid).unwrap_or(0),
        pidfd,
    })
}

/// The child: each step a raw syscall on prepared data; on failure the
/// step and errno go to the parent and the child exits with 127.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Ctx`, alive and unchanged while we
    // run (the parent sleeps until we exec or exit).
    let ctx = unsafe { &*(arg as *const Ctx) };
    let step = child_steps(ctx).err().unwrap_or(0);
    ctx.errno.store(last_errno(), Ordering::Relaxed);
    ctx.step.store(step.max(1), Ordering::Release);
    // SAFETY: _exit ends only this process; no destructors, no atexit.
    unsafe { libc::_exit(127) }
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ok(rc: libc::c_int, step: u8) -> Result<(), u8> {
    if rc < 0 {
        Err(step)
    } else {
        Ok(())
    }
}

/// Steps 1-9; returns only on failure (or, with `Ok`, never: execve
/// replaced us).
fn child_steps(ctx: &Ctx) -> Result<(), u8> {
    let s = &ctx.setup;
    // SAFETY: every call in the block is a plain syscall wrapper on
    // integers, on pointers to locals, or on the parent's prepared
    // NUL-terminated strings and NULL-terminated arrays.
    unsafe {
        // 1. Handlers are the broker's code: back to default (ignored
        // signals stay ignored, as over exec, except SIGPIPE, as std's
        // Command does).
        for sig in 1..=libc::SIGRTMAX() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue; // SIGKILL, SIGSTOP, glibc's internal ones
            }
            let reset = match old.sa_sigaction {
                libc::SIG_DFL => false,
                libc::SIG_IGN => sig == libc::SIGPIPE,
                _ => true,
            };
            if reset {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                ok(libc::sigaction(sig, &dfl, std::ptr::null_mut()), 1)?;
            }
        }
        if s.new_process_group {
            ok(libc::setpgid(0, 0), 2)?;
        }
        if let Some(fd) = s.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(3);
            }
        }
        if let Some(fds) = s.stdio {
            for (target, fd) in (0..).zip(fds) {
                ok(libc::dup2(fd, target), 4)?;
            }
        }
        if let Some(fd) = s.control {
            if fd == CONTROL_FD {
                ok(libc::fcntl(CONTROL_FD, libc::F_SETFD, 0), 5)?;
            } else {
                // dup2 clears FD_CLOEXEC on the new fd.
                ok(libc::dup2(fd, CONTROL_FD), 5)?;
            }
        }
        if let Some([ns, dir]) = s.root {
            ok(libc::dup2(ns, ROOT_NS_FD), 10)?;
            ok(libc::dup2(dir, ROOT_DIR_FD), 10)?;
        }
        if let Some(bytes) = s.memlock {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            ok(libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim), 6)?;
        }
        if s.cloexec_rest {
            let first = if s.root.is_some() {
                ROOT_DIR_FD + 1
            } else if s.control.is_some() {
                CONTROL_FD + 1
            } else {
                3
            };
            let rc = libc::syscall(
                libc::SYS_close_range,
                first,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            ok(i32::try_from(rc).unwrap_or(-1), 7)?;
        }
        ok(libc::chdir(ctx.root), 8)?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(ctx.path, ctx.argv, ctx.envp);
    }
    Err(9)
}

/// An anonymous mapping for the child's stack, with a guard page below.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    fn new() -> io::Result<Stack> {
        let guard = 4096;
        let len = STACK + guard;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of our own mapping.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address (stacks grow down); page-aligned.
    fn top(&self) -> *mut libc::c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our mapping; the child that used it has exec'd or exited.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Every signal blocked in this thread until dropped (then the old mask).
struct BlockAll(libc::sigset_t);

impl BlockAll {
    fn new() -> io::Result<BlockAll> {
        // SAFETY: sigfillset/pthread_sigmask on local sets.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(BlockAll(old))
        }
    }
}

impl Drop for BlockAll {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn wait(c: &Child) -> i32 {
        let st = rustix::process::waitid(
            rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&c.pidfd)),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap()
        .unwrap();
        st.exit_status().unwrap()
    }

    #[test]
    fn child_gets_args_env_stdio_control_fd_memlock_and_root_dir() {
        let (r, w) = std::io::pipe().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let script = "echo \"$1 $FOO $(pwd) $(ulimit -l)\"; \
                      [ -S /proc/self/fd/3 ] && echo control; \
                      [ -e /proc/self/fd/4 ] || echo no-fd-4";
        let c = spawn(
            Path::new("/bin/sh"),
            &[
                OsStr::new("-c"),
                OsStr::new(script),
                OsStr::new("sh"),
                OsStr::new("one"),
            ],
            &[("FOO", "bar")],
            Setup {
                stdio: Some([null.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()]),
                control: Some(theirs.as_raw_fd()),
                memlock: Some(64 * 1024),
                cloexec_rest: true,
                new_process_group: true,
                cgroup_procs: None,
                root: None,
            },
        )
        .unwrap();
        drop(w);
        drop(theirs);
        drop(ours);
        let mut out = String::new();
        { r }.read_to_string(&mut out).unwrap();
        assert_eq!(wait(&c), 0);
        assert_eq!(out, "one bar / 64\ncontrol\nno-fd-4\n");
    }

    #[test]
    fn a_missing_program_is_reported_with_its_step_and_reaped() {
        let e = spawn(
            Path::new("/nonexistent/tapdisk"),
            &[],
            &[],
            Setup::default(),
        )
        .unwrap_err();
        match e {
            SpawnError::Child { step, source } => {
                assert_eq!(step, "execve");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_failing_setup_step_is_named() {
        // fd 12345 is not open: dup2 fails with EBADF.
        let e = spawn(
            Path::new("/bin/true"),
            &[],
            &[],
            Setup {
                control: Some(12345),
                ..Setup::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("moving the control socket to fd 3: Bad file descriptor"),
            "{e}"
        );
    }
}
