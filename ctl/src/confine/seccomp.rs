//! The seccomp allowlist of `tap-ctl vhd`'s image parser, as data, and the
//! classic-BPF program built from it.
//!
//! Anything not listed fails with EPERM rather than killing the process:
//! the tool then reports a clear error instead of dying of SIGSYS, and a
//! refused call has no effect either way. A foreign architecture (an x32 or
//! 32-bit call on x86_64) kills the process.

use libc::{c_long, sock_filter};

/// What the filter does with one system call.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Allow,
    /// Fail with this errno (ENOSYS makes libc fall back to an older call).
    Errno(i32),
    /// Allow only these ioctl requests (argument 1).
    Ioctl(&'static [u32]),
    /// Allow only thread creation (`CLONE_THREAD` in argument 0): a thread
    /// stays in the domain, and a forked process could serve nothing new.
    CloneThread,
}

/// One rule: the call, what happens to it, and why it is needed.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub nr: c_long,
    pub action: Action,
    pub why: &'static str,
}

const fn allow(nr: c_long, why: &'static str) -> Rule {
    Rule {
        nr,
        action: Action::Allow,
        why,
    }
}

/// `TCGETS`, `TIOCGWINSZ`: is stderr a terminal and how wide (progress bar).
const TERMINAL_IOCTLS: &[u32] = &[libc::TCGETS as u32, libc::TIOCGWINSZ as u32];

/// The allowlist. No call here takes a path except the stat family (which
/// shows metadata, never contents: std's `File::metadata` uses them on fds)
/// and `getcwd`; nothing opens, creates, links or removes a file.
pub const RULES: &[Rule] = &[
    allow(
        libc::SYS_read,
        "image data, stdin (vhd write), the privsep socket",
    ),
    allow(libc::SYS_write, "output image, stdout (vhd read), messages"),
    allow(libc::SYS_readv, "std's vectored reads"),
    allow(libc::SYS_writev, "std's vectored writes"),
    allow(libc::SYS_pread64, "positioned image reads"),
    allow(libc::SYS_pwrite64, "positioned image writes"),
    allow(libc::SYS_preadv, "positioned vectored reads"),
    allow(libc::SYS_pwritev, "positioned vectored writes"),
    allow(libc::SYS_lseek, "size of a block device; SEEK_DATA/HOLE"),
    allow(libc::SYS_fsync, "durability (--sync, flush)"),
    allow(libc::SYS_fdatasync, "durability (--sync, flush)"),
    allow(
        libc::SYS_fallocate,
        "punching holes, preallocating fixed VHDs",
    ),
    allow(libc::SYS_ftruncate, "sizing output images, resize"),
    allow(libc::SYS_fstat, "file size and type"),
    allow(libc::SYS_newfstatat, "glibc's fstat (AT_EMPTY_PATH)"),
    allow(libc::SYS_statx, "std's File::metadata"),
    allow(libc::SYS_copy_file_range, "std::io::copy between files"),
    allow(libc::SYS_close, "dropping files"),
    allow(libc::SYS_dup, "File::try_clone"),
    allow(libc::SYS_fcntl, "O_NONBLOCK off, F_DUPFD_CLOEXEC"),
    allow(
        libc::SYS_getcwd,
        "absolute paths for parent locators (set-parent, snapshot)",
    ),
    allow(libc::SYS_sendmsg, "asking the parent for files"),
    allow(
        libc::SYS_recvmsg,
        "receiving files (SCM_RIGHTS) from the parent",
    ),
    allow(libc::SYS_mmap, "allocator"),
    allow(libc::SYS_munmap, "allocator"),
    allow(libc::SYS_mremap, "allocator"),
    allow(libc::SYS_mprotect, "allocator, thread stacks' guard pages"),
    allow(libc::SYS_brk, "allocator"),
    allow(libc::SYS_madvise, "allocator"),
    allow(libc::SYS_futex, "locks, thread joins"),
    allow(libc::SYS_sched_yield, "spin locks"),
    allow(
        libc::SYS_sched_getaffinity,
        "std::thread::available_parallelism",
    ),
    allow(libc::SYS_getrandom, "HashMap seeds, UUIDs of new images"),
    allow(libc::SYS_clock_gettime, "progress rates, timestamps"),
    allow(libc::SYS_clock_nanosleep, "progress bar ticker"),
    allow(libc::SYS_nanosleep, "progress bar ticker"),
    allow(libc::SYS_gettid, "std thread ids"),
    allow(libc::SYS_getpid, "std"),
    allow(libc::SYS_rt_sigaction, "std's SIGPIPE setup"),
    allow(libc::SYS_rt_sigprocmask, "thread creation"),
    allow(libc::SYS_rt_sigreturn, "returning from a signal handler"),
    allow(
        libc::SYS_sigaltstack,
        "std's stack overflow handler in new threads",
    ),
    allow(libc::SYS_set_robust_list, "new threads"),
    allow(libc::SYS_rseq, "new threads (glibc)"),
    allow(libc::SYS_exit, "thread exit"),
    allow(libc::SYS_exit_group, "process exit"),
    allow(libc::SYS_restart_syscall, "interrupted sleeps"),
    Rule {
        nr: libc::SYS_ioctl,
        action: Action::Ioctl(TERMINAL_IOCTLS),
        why: "terminal checks for the progress bar",
    },
    Rule {
        nr: libc::SYS_clone,
        action: Action::CloneThread,
        why: "progress bar thread",
    },
    Rule {
        nr: libc::SYS_clone3,
        action: Action::Errno(libc::ENOSYS),
        why: "its flags are out of a filter's reach: glibc falls back to clone",
    },
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

// Classic BPF opcodes (linux/filter.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets in struct seccomp_data (little-endian: low word first).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LO: u32 = 16;
const ARG1_LO: u32 = 24;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

fn ret(k: u32) -> sock_filter {
    stmt(RET_K, k)
}

fn errno(e: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

/// The filter for this architecture, `None` on one we have no filter for.
pub fn program() -> Option<Vec<sock_filter>> {
    let arch = AUDIT_ARCH?;
    let deny = errno(libc::EPERM);
    let mut p = vec![
        stmt(LD_W_ABS, ARCH),
        jeq(arch, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, NR),
    ];
    for r in RULES {
        let nr = u32::try_from(r.nr).ok()?;
        // Each block ends in a return, so A (the syscall number) is only
        // clobbered on the path that has matched.
        let block: Vec<sock_filter> = match r.action {
            Action::Allow => vec![ret(libc::SECCOMP_RET_ALLOW)],
            Action::Errno(e) => vec![ret(errno(e))],
            Action::Ioctl(cmds) => {
                let mut b = vec![stmt(LD_W_ABS, ARG1_LO)];
                for c in cmds {
                    b.push(jeq(*c, 0, 1));
                    b.push(ret(libc::SECCOMP_RET_ALLOW));
                }
                b.push(ret(deny));
                b
            }
            Action::CloneThread => {
                let t = libc::CLONE_THREAD as u32;
                vec![
                    stmt(LD_W_ABS, ARG0_LO),
                    stmt(AND_K, t),
                    jeq(t, 0, 1),
                    ret(libc::SECCOMP_RET_ALLOW),
                    ret(deny),
                ]
            }
        };
        p.push(jeq(nr, 0, u8::try_from(block.len()).ok()?));
        p.extend(block);
    }
    p.push(ret(deny));
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_rules_name_each_call_once_and_no_path_openers() {
        let mut seen = std::collections::HashSet::new();
        for r in RULES {
            assert!(seen.insert(r.nr), "syscall {} listed twice", r.nr);
            assert!(!r.why.is_empty());
        }
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_unlinkat,
            libc::SYS_io_uring_setup,
            libc::SYS_kill,
            libc::SYS_ptrace,
        ] {
            assert!(
                !seen.contains(&forbidden),
                "{forbidden} must not be allowed"
            );
        }
    }

    #[test]
    fn seccomp_program_fits_classic_bpf() {
        let p = program().expect("x86_64 or aarch64");
        assert!(p.len() < 4096);
        assert_eq!(p.last().unwrap().k, errno(libc::EPERM));
    }
}
