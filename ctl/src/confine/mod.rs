//! Confinement of the process that parses images for `tap-ctl vhd`.
//!
//! An image is untrusted input and `tap-ctl vhd` often runs as root, so the
//! bytes are parsed by a forked child that first gives up the filesystem
//! (`landlock`: a ruleset that handles every access right and grants
//! none), every capability, and most system calls (`seccomp`: an allowlist in which no call
//! opens, creates or removes a path, nor execs, makes sockets or signals
//! others). It gets its files from the unconfined parent over a socket
//! ([`crate::privsep`]), which opens only what the command line names and
//! parents that follow the locator rule.
//!
//! Why hand-written BPF and raw landlock calls rather than the worker's
//! `seccompiler`/`landlock` crates or the `tapdisk` binary: `tap-ctl` must
//! not depend on the worker (issue 10: no seccompiler, landlock or caps in
//! its tree), and re-executing a `tapdisk` found on disk would make the
//! tool's safety depend on which binary sits at some path. The filter is
//! short enough to read in full and its rules are data ([`seccomp::RULES`]).

pub mod landlock;
pub mod seccomp;

use crate::sys;

/// A step of confinement that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot drop capabilities: {0}")]
    Caps(std::io::Error),
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("cannot apply the landlock ruleset: {0}")]
    Landlock(std::io::Error),
    #[error(
        "cannot install the seccomp filter ({0}); tap-ctl vhd does not parse images \
         unconfined: run it on a kernel with CONFIG_SECCOMP_FILTER"
    )]
    Seccomp(std::io::Error),
    #[error("tap-ctl vhd confines its image parser only on x86_64 and aarch64")]
    Arch,
}

/// What [`confine`] put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confined {
    /// The landlock ABI enforced, `None` where the kernel has no landlock
    /// (the seccomp filter alone then keeps paths from being opened).
    pub landlock_abi: Option<u32>,
}

/// Confine the calling thread (and its future threads) for good: no
/// capabilities, no new privileges, a deny-all landlock domain, then the
/// seccomp allowlist.
/// Call in a single-threaded process.
pub fn confine() -> Result<Confined, ConfineError> {
    let filter = seccomp::program().ok_or(ConfineError::Arch)?;
    sys::drop_all_caps().map_err(ConfineError::Caps)?;
    sys::no_new_privs().map_err(ConfineError::NoNewPrivs)?;
    let landlock_abi = landlock::deny_all().map_err(ConfineError::Landlock)?;
    sys::seccomp_filter(&filter).map_err(ConfineError::Seccomp)?;
    Ok(Confined { landlock_abi })
}
