//! Step 12: the seccomp allowlist, installed on every thread at once.
//!
//! The filter is data: [`base_rules`] holds what every worker needs, and one
//! function per frontend ([`nbd_rules`], [`fuse_rules`], [`ublk_rules`]) adds
//! what only that frontend needs. Every entry carries the reason it is
//! there. Anything not listed kills the whole process (`SECCOMP_RET_KILL_PROCESS`),
//! so a compromised worker dies on its first stray syscall instead of
//! probing.
//!
//! Two filters are installed, both with `TSYNC`:
//! 1. a small errno filter, for syscalls that libc probes and falls back
//!    from (`clone3` → ENOSYS makes glibc use `clone`, whose flags we can
//!    check; clone3 passes them in memory, out of seccomp's reach);
//! 2. the allowlist, default action kill-process.
//!
//! The kernel applies the most restrictive verdict of all filters, so a
//! syscall must be allowed by the allowlist *and* not be in the errno list.
//!
//! io_uring operations do not pass through seccomp; they are restricted per
//! ring (see `crate::io::ring`), and every ring is made before this filter
//! is loaded: `io_uring_setup` is not on any list, so no ring can be made
//! after confinement.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use tapjail_common::proto::FrontendKind;

/// One allowed syscall: its number, name, the argument conditions of which
/// at least one must hold (none: any arguments), and why it is allowed.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub nr: i64,
    pub name: &'static str,
    pub when: Vec<Vec<Cond>>,
    pub why: &'static str,
}

/// An argument condition: `(arg[index] & mask) == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub index: u8,
    pub mask: u64,
    pub value: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter on all threads: {0}")]
    Install(String),
    #[error("seccomp is not supported on this architecture")]
    Arch,
}

fn allow(nr: libc::c_long, name: &'static str, why: &'static str) -> Allowed {
    Allowed {
        nr,
        name,
        when: Vec::new(),
        why,
    }
}

fn allow_if(
    nr: libc::c_long,
    name: &'static str,
    when: Vec<Vec<Cond>>,
    why: &'static str,
) -> Allowed {
    Allowed {
        nr,
        name,
        when,
        why,
    }
}

/// `arg[index] == value` on the low 32 bits only, for `int`/`unsigned int`
/// arguments whose upper half the kernel ignores.
fn eq32(index: u8, value: u64) -> Cond {
    Cond {
        index,
        mask: u64::from(u32::MAX),
        value: value & u64::from(u32::MAX),
    }
}

/// `(arg[index] & mask) == value`.
fn masked(index: u8, mask: u64, value: u64) -> Cond {
    Cond { index, mask, value }
}

fn one_of32(index: u8, values: &[u64]) -> Vec<Vec<Cond>> {
    values.iter().map(|&v| vec![eq32(index, v)]).collect()
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// Flags glibc's `pthread_create` passes to `clone`; we require the
/// thread-making ones and forbid every namespace flag, so `clone` can only
/// ever make a thread of this process, never a new process.
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_FILES
    | libc::CLONE_FS) as u64;
const CLONE_FORBIDDEN: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_PTRACE
    | libc::CLONE_VFORK
    | libc::CLONE_PARENT
    | libc::CLONE_UNTRACED) as u64;

/// glibc's internal real-time signals (SIGRTMIN is 34 to applications
/// because glibc keeps 32 and 33 for these).
const GLIBC_SIGCANCEL: u64 = 32;
const GLIBC_SIGSETXID: u64 = 33;

// io_uring_register opcodes (linux/io_uring.h).
const IORING_REGISTER_FILES_UPDATE: u64 = 6;
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;

/// What every worker needs, whatever its frontend.
// The libc constants' types differ between architectures.
#[allow(clippy::unnecessary_cast)]
pub fn base_rules() -> Vec<Allowed> {
    vec![
        // --- talking over fds we were handed ---
        allow(
            libc::SYS_read,
            "read",
            "read from sockets and devices we were handed",
        ),
        allow(
            libc::SYS_write,
            "write",
            "write to sockets we were handed and to stderr (diagnostics)",
        ),
        allow(
            libc::SYS_readv,
            "readv",
            "scatter reads from sockets we were handed",
        ),
        allow(
            libc::SYS_writev,
            "writev",
            "reply header + data in one write to a client socket",
        ),
        allow(
            libc::SYS_recvfrom,
            "recvfrom",
            "recv(2) on the control socket (frame payloads)",
        ),
        allow(libc::SYS_sendto, "sendto", "send(2) on the control socket"),
        allow(
            libc::SYS_recvmsg,
            "recvmsg",
            "control frames carry fds (SCM_RIGHTS): leaf/parent images, frontend fds",
        ),
        allow(
            libc::SYS_sendmsg,
            "sendmsg",
            "control frames and socket replies",
        ),
        allow(
            libc::SYS_close,
            "close",
            "drop fds of closed images, rings and clients",
        ),
        allow_if(
            libc::SYS_fcntl,
            "fcntl",
            one_of32(
                1,
                &[
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                ],
            ),
            "read/set O_DIRECT and O_NONBLOCK, and FD_CLOEXEC, on fds we hold; no F_DUPFD",
        ),
        allow_if(
            libc::SYS_ioctl,
            "ioctl",
            one_of32(1, &[libc::FIONBIO as u64, libc::FIOCLEX as u64]),
            "std's set_nonblocking (FIONBIO) and set_cloexec (FIOCLEX); no device ioctls",
        ),
        // --- image files (the data path itself goes through io_uring) ---
        allow(
            libc::SYS_fstat,
            "fstat",
            "length of an image file we were handed",
        ),
        allow(
            libc::SYS_pwrite64,
            "pwrite64",
            "buffered image writes (io_uring would punt each to a kernel thread; see io::file)",
        ),
        allow(
            libc::SYS_fdatasync,
            "fdatasync",
            "a CBT log's bits are on disk before the write they cover is made (cbt::control)",
        ),
        allow(
            libc::SYS_ftruncate,
            "ftruncate",
            "Backing::set_len: the VHD engine grows/trims its file",
        ),
        allow(
            libc::SYS_io_uring_enter,
            "io_uring_enter",
            "submit image reads/writes/fsync/fallocate on the rings made before confinement \
             and wait for them",
        ),
        allow_if(
            libc::SYS_io_uring_register,
            "io_uring_register",
            one_of32(1, &[IORING_REGISTER_FILES_UPDATE]),
            "put an image file the worker holds into (or out of) its slot of a pre-made ring; \
             each ring's restrictions allow this one register op and nothing else",
        ),
        // --- memory ---
        allow(libc::SYS_brk, "brk", "malloc's main arena"),
        allow_if(
            libc::SYS_mmap,
            "mmap",
            vec![vec![masked(2, PROT_EXEC, 0)]],
            "malloc, thread stacks, io_uring rings; never executable",
        ),
        allow_if(
            libc::SYS_mprotect,
            "mprotect",
            vec![vec![masked(2, PROT_EXEC, 0)]],
            "malloc arena growth and stack guard pages; never executable",
        ),
        allow(libc::SYS_munmap, "munmap", "free memory"),
        allow(libc::SYS_mremap, "mremap", "realloc of large buffers"),
        allow_if(
            libc::SYS_madvise,
            "madvise",
            one_of32(2, &[libc::MADV_DONTNEED as u64, libc::MADV_FREE as u64]),
            "malloc and thread exit give memory back; nothing else",
        ),
        // --- threads and synchronisation ---
        allow_if(
            libc::SYS_clone,
            "clone",
            vec![vec![masked(
                0,
                CLONE_THREAD_FLAGS | CLONE_FORBIDDEN,
                CLONE_THREAD_FLAGS,
            )]],
            "pthread_create: threads of this process only, never a new process or namespace",
        ),
        allow(
            libc::SYS_clone3,
            "clone3",
            "answered ENOSYS by the errno filter so glibc falls back to clone",
        ),
        allow(libc::SYS_futex, "futex", "mutexes, condvars, thread join"),
        allow(
            libc::SYS_set_robust_list,
            "set_robust_list",
            "glibc registers it in every new thread",
        ),
        allow(
            libc::SYS_rseq,
            "rseq",
            "glibc registers restartable sequences in every new thread",
        ),
        allow(
            libc::SYS_sched_yield,
            "sched_yield",
            "spin-then-park in locks",
        ),
        allow(
            libc::SYS_sched_getaffinity,
            "sched_getaffinity",
            "glibc's malloc reads the CPU mask when a thread first allocates",
        ),
        allow_if(
            libc::SYS_prctl,
            "prctl",
            vec![
                vec![eq32(0, libc::PR_SET_NAME as u64)],
                vec![eq32(0, libc::PR_GET_NAME as u64)],
            ],
            "name our threads (std::thread::Builder::name); no other prctl",
        ),
        allow(
            libc::SYS_rt_sigprocmask,
            "rt_sigprocmask",
            "glibc masks signals around thread creation",
        ),
        allow_if(
            libc::SYS_rt_sigaction,
            "rt_sigaction",
            one_of32(0, &[GLIBC_SIGCANCEL, GLIBC_SIGSETXID]),
            "glibc installs its internal SIGCANCEL/SIGSETXID handlers at the first pthread_create; no other handler",
        ),
        allow(
            libc::SYS_rt_sigreturn,
            "rt_sigreturn",
            "return from a signal handler",
        ),
        allow(
            libc::SYS_sigaltstack,
            "sigaltstack",
            "Rust's stack-overflow guard sets one per thread",
        ),
        allow(libc::SYS_exit, "exit", "a thread ends"),
        allow(libc::SYS_exit_group, "exit_group", "the worker ends"),
        // --- identity, time, randomness ---
        allow(libc::SYS_getpid, "getpid", "FromWorker::Ready{pid}"),
        allow(libc::SYS_gettid, "gettid", "glibc/std thread bookkeeping"),
        allow(
            libc::SYS_clock_gettime,
            "clock_gettime",
            "latency stats (vDSO fallback)",
        ),
        allow(
            libc::SYS_clock_nanosleep,
            "clock_nanosleep",
            "thread::sleep in retry back-off",
        ),
        allow(
            libc::SYS_nanosleep,
            "nanosleep",
            "thread::sleep on older libcs",
        ),
        allow(
            libc::SYS_restart_syscall,
            "restart_syscall",
            "the kernel resumes an interrupted wait through it (futex with a timeout, \
             nanosleep, poll set a restart block); io_uring task work interrupts waits \
             like a signal does, so every frontend's paced or idle threads meet it: \
             missing, a throttled NBD worker was killed (SIGSYS) under load",
        ),
        allow(libc::SYS_getrandom, "getrandom", "HashMap seeds"),
    ]
}

/// What the NBD frontend adds: accepting clients and hanging up on them.
pub fn nbd_rules() -> Vec<Allowed> {
    vec![
        allow(
            libc::SYS_accept4,
            "accept4",
            "accept NBD clients on the listening socket we were handed",
        ),
        allow(
            libc::SYS_shutdown,
            "shutdown",
            "hang up on a hostile client; wake threads blocked on a socket when stopping",
        ),
        allow_if(
            libc::SYS_setsockopt,
            "setsockopt",
            vec![
                vec![
                    eq32(1, libc::SOL_SOCKET as u64),
                    eq32(2, libc::SO_RCVTIMEO as u64),
                ],
                vec![
                    eq32(1, libc::SOL_SOCKET as u64),
                    eq32(2, libc::SO_SNDTIMEO as u64),
                ],
            ],
            "handshake timeouts, so a silent client cannot hold a connection slot forever",
        ),
    ]
}

/// What the kernel-nbd frontend adds: the NBD server's rules without
/// `accept4` (the broker hands over connected sockets; there is nothing
/// to accept).
pub fn nbd_kernel_rules() -> Vec<Allowed> {
    nbd_rules()
        .into_iter()
        .filter(|r| r.name != "accept4")
        .collect()
}

/// What the FUSE frontend adds. Requests are `read(2)` and replies
/// `writev(2)` on the `/dev/fuse` fd we were handed, and O_NONBLOCK is set
/// with `fcntl(F_SETFL)`, all in the base set; the frontend needs only a
/// way for its idle threads to wait, and to be told to stop.
pub fn fuse_rules() -> Vec<Allowed> {
    vec![
        allow(
            libc::SYS_poll,
            "poll",
            "idle FUSE threads wait for a request on /dev/fuse or the stop eventfd",
        ),
        allow(
            libc::SYS_ppoll,
            "ppoll",
            "the same wait where libc implements poll() with ppoll",
        ),
        allow_if(
            libc::SYS_epoll_create1,
            "epoll_create1",
            one_of32(0, &[libc::EPOLL_CLOEXEC as u64]),
            "each FUSE thread's wait set: /dev/fuse (EPOLLEXCLUSIVE, so one idle thread \
             wakes per request) and the stop eventfd",
        ),
        allow_if(
            libc::SYS_epoll_ctl,
            "epoll_ctl",
            one_of32(1, &[libc::EPOLL_CTL_ADD as u64]),
            "fill a FUSE thread's wait set once (add only)",
        ),
        allow(
            libc::SYS_epoll_wait,
            "epoll_wait",
            "an idle FUSE thread waits for a request or stop",
        ),
        allow(
            libc::SYS_epoll_pwait,
            "epoll_pwait",
            "the same wait where libc implements epoll_wait() with epoll_pwait",
        ),
        allow_if(
            libc::SYS_eventfd2,
            "eventfd2",
            one_of32(1, &[(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) as u64]),
            "the FUSE frontend's stop flag (an eventfd every serving thread polls); \
             written with write(2), never read",
        ),
    ]
}

/// What the ublk frontend adds to the base set (which already covers:
/// per queue, filling the slots of a ring made before confinement with
/// `io_uring_register` FILES_UPDATE, commands and waits through
/// `io_uring_enter`; the descriptor array as a read-only shared `mmap` of
/// `/dev/ublkcN` and the request buffers as an anonymous one, never
/// executable; buffered image writes with `pwrite64`; waking the queue with
/// `write` on its eventfd; threads with `clone`). Request data is copied by
/// the driver into and out of the buffers (no `UBLK_F_USER_COPY`, so no
/// pread/pwrite on the char device). Image I/O runs on the queue rings,
/// which are restricted to URING_CMD, READ, WRITE and FSYNC on registered
/// files (see `frontend::ublk::rings`).
// The libc constants' types differ between architectures.
#[allow(clippy::unnecessary_cast)]
pub fn ublk_rules() -> Vec<Allowed> {
    vec![
        allow_if(
            libc::SYS_eventfd2,
            "eventfd2",
            one_of32(1, &[libc::EFD_CLOEXEC as u64]),
            "one eventfd per ublk queue, made as its thread starts: slow-path threads \
             write it to wake the queue ring, whose READ on the registered fd takes the count",
        ),
        allow_if(
            libc::SYS_io_uring_register,
            "io_uring_register",
            one_of32(1, &[IORING_REGISTER_ENABLE_RINGS]),
            "a queue thread enables its pre-made (disabled, restricted) ring, which makes it \
             the ring's only submitter",
        ),
    ]
}

/// The full allowlist for a worker serving `frontend`.
pub fn rules_for(frontend: FrontendKind) -> Vec<Allowed> {
    let mut rules = base_rules();
    rules.extend(match frontend {
        FrontendKind::Nbd => nbd_rules(),
        FrontendKind::NbdKernel => nbd_kernel_rules(),
        FrontendKind::Fuse => fuse_rules(),
        FrontendKind::Ublk => ublk_rules(),
    });
    rules
}

/// Syscalls answered with an errno instead of being run (see module doc).
pub fn errno_rules() -> Vec<(libc::c_long, &'static str, u32)> {
    vec![(libc::SYS_clone3, "clone3", libc::ENOSYS as u32)]
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch)
}

fn condition(c: &Cond) -> Result<Vec<SeccompCondition>, SeccompError> {
    let build = |len: Len, op: Op, value: u64| {
        SeccompCondition::new(c.index, len, op, value)
            .map_err(|e| SeccompError::Build(e.to_string()))
    };
    if c.mask == u64::from(u32::MAX) {
        Ok(vec![build(Len::Dword, Op::Eq, c.value)?])
    } else if c.mask == u64::MAX {
        Ok(vec![build(Len::Qword, Op::Eq, c.value)?])
    } else {
        Ok(vec![build(Len::Qword, Op::MaskedEq(c.mask), c.value)?])
    }
}

/// Compile the allowlist (merging duplicate syscalls: any of their
/// conditions may match; an unconditional entry wins).
pub fn compile_allowlist(rules: &[Allowed]) -> Result<BpfProgram, SeccompError> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for r in rules {
        let entry = map.entry(r.nr).or_insert_with(|| Some(Vec::new()));
        if r.when.is_empty() {
            *entry = None; // unconditional
            continue;
        }
        if let Some(list) = entry {
            for alt in &r.when {
                let mut conds = Vec::new();
                for c in alt {
                    conds.extend(condition(c)?);
                }
                list.push(SeccompRule::new(conds).map_err(|e| SeccompError::Build(e.to_string()))?);
            }
        }
    }
    let map: BTreeMap<i64, Vec<SeccompRule>> = map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

fn compile_errno() -> Result<Vec<BpfProgram>, SeccompError> {
    // One filter per errno value (seccompiler has one match action per filter).
    let mut by_errno: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for (nr, _, errno) in errno_rules() {
        by_errno.entry(errno).or_default().push(nr);
    }
    by_errno
        .into_iter()
        .map(|(errno, nrs)| {
            let map = nrs.into_iter().map(|nr| (nr, Vec::new())).collect();
            let filter = SeccompFilter::new(
                map,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                target_arch()?,
            )
            .map_err(|e| SeccompError::Build(e.to_string()))?;
            filter
                .try_into()
                .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
        })
        .collect()
}

/// Install the errno filter and then the allowlist for `frontend` on every
/// thread of the process.
pub fn install(frontend: FrontendKind) -> Result<(), SeccompError> {
    let errno = compile_errno()?;
    let allowlist = compile_allowlist(&rules_for(frontend))?;
    for prog in errno.iter().chain(std::iter::once(&allowlist)) {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frontend_filter_compiles() {
        for kind in [
            FrontendKind::Nbd,
            FrontendKind::NbdKernel,
            FrontendKind::Fuse,
            FrontendKind::Ublk,
        ] {
            let prog = compile_allowlist(&rules_for(kind)).unwrap();
            assert!(prog.len() > 10, "{kind:?}");
        }
        assert_eq!(compile_errno().unwrap().len(), 1);
    }

    #[test]
    fn nbd_kernel_worker_cannot_accept_connections() {
        let names: Vec<&str> = rules_for(FrontendKind::NbdKernel)
            .iter()
            .map(|r| r.name)
            .collect();
        assert!(!names.contains(&"accept4"), "{names:?}");
        assert!(names.contains(&"shutdown"), "{names:?}");
    }

    #[test]
    fn every_allowed_syscall_says_why() {
        for r in rules_for(FrontendKind::Nbd) {
            assert!(r.why.len() > 8, "{} has no reason", r.name);
        }
    }

    #[test]
    fn every_frontend_allows_the_kernel_to_restart_an_interrupted_wait() {
        for kind in [
            FrontendKind::Nbd,
            FrontendKind::NbdKernel,
            FrontendKind::Fuse,
            FrontendKind::Ublk,
        ] {
            assert!(
                rules_for(kind)
                    .iter()
                    .any(|r| r.nr == libc::SYS_restart_syscall),
                "{kind:?} lacks restart_syscall"
            );
        }
    }

    #[test]
    fn dangerous_syscalls_are_not_allowed() {
        let names: Vec<&str> = [
            FrontendKind::Nbd,
            FrontendKind::NbdKernel,
            FrontendKind::Fuse,
            FrontendKind::Ublk,
        ]
        .into_iter()
        .flat_map(rules_for)
        .map(|r| r.name)
        .collect();
        for bad in [
            "open",
            "openat",
            "openat2",
            "execve",
            "execveat",
            "socket",
            "connect",
            "bind",
            "ptrace",
            "fork",
            "vfork",
            "unshare",
            "setns",
            "mount",
            "chdir",
            "kill",
            "tgkill",
            "process_vm_readv",
            "seccomp",
            "bpf",
            "init_module",
            "setuid",
            "prlimit64",
            "io_uring_setup",
            "pivot_root",
            "chroot",
        ] {
            assert!(!names.contains(&bad), "{bad} must not be allowed");
        }
    }

    #[test]
    fn ublk_adds_only_its_eventfd_and_enabling_its_rings() {
        let extra: Vec<&str> = ublk_rules().iter().map(|r| r.name).collect();
        assert_eq!(extra, ["eventfd2", "io_uring_register"]);
        assert_eq!(
            ublk_rules()[0].when,
            vec![vec![eq32(1, libc::EFD_CLOEXEC as u64)]]
        );
        let enable = &ublk_rules()[1];
        assert_eq!(
            enable.when,
            vec![vec![eq32(1, IORING_REGISTER_ENABLE_RINGS)]]
        );
        let nbd: Vec<&str> = rules_for(FrontendKind::Nbd)
            .iter()
            .map(|r| r.name)
            .collect();
        assert!(!nbd.contains(&"eventfd2"));
        assert!(rules_for(FrontendKind::Nbd)
            .iter()
            .filter(|r| r.name == "io_uring_register")
            .all(|r| !r
                .when
                .contains(&vec![eq32(1, IORING_REGISTER_ENABLE_RINGS)])));
    }

    #[test]
    fn no_frontend_may_make_a_ring_or_register_anything_but_slot_updates() {
        for kind in [
            FrontendKind::Nbd,
            FrontendKind::NbdKernel,
            FrontendKind::Fuse,
            FrontendKind::Ublk,
        ] {
            let rules = rules_for(kind);
            assert!(
                rules.iter().all(|r| r.nr != libc::SYS_io_uring_setup),
                "{kind:?}: io_uring_setup must not be allowed"
            );
            for r in rules.iter().filter(|r| r.name == "io_uring_register") {
                for alt in &r.when {
                    assert!(
                        *alt == vec![eq32(1, IORING_REGISTER_FILES_UPDATE)]
                            || *alt == vec![eq32(1, IORING_REGISTER_ENABLE_RINGS)],
                        "{kind:?}: io_uring_register {alt:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ioctl_mmap_and_clone_are_argument_restricted() {
        for r in base_rules() {
            if [
                "ioctl",
                "mmap",
                "mprotect",
                "clone",
                "fcntl",
                "prctl",
                "io_uring_register",
            ]
            .contains(&r.name)
            {
                assert!(
                    !r.when.is_empty(),
                    "{} must have argument conditions",
                    r.name
                );
            }
        }
    }
}
