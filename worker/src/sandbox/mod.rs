//! Confinement of a worker, applied before the first byte of image data is
//! parsed. Each step is its own module; [`confine`] runs them in order:
//!
//! 1. close every fd not on the keep list ([`fds`])
//! 2. clear the environment ([`env`](mod@env))
//! 3. NOFILE, NPROC (a thread budget, see there), CORE=0, MEMLOCK ([`rlimit`])
//! 4. new IPC/UTS/network/mount namespaces, required as root ([`ns`])
//! 5. an empty read-only root in that mount namespace ([`mount`])
//! 6. every io_uring ring the worker will use, made and restricted
//!    ([`rings`]): io_uring operations bypass seccomp, which refuses
//!    `io_uring_setup` from step 12 on
//! 7. `mlockall(MCL_CURRENT|MCL_FUTURE)` ([`mlock`]), rings included
//! 8. setgroups/setgid/setuid to the worker's own ids ([`ids`]), then not
//!    dumpable ([`dumpable`]; the switch resets the flag)
//! 9. drop every capability, lock the securebits ([`caps`]); then, for a
//!    broker's worker, check that no other process runs as its uid
//!    ([`sole_uid`])
//! 10. `PR_SET_NO_NEW_PRIVS` ([`nnp`])
//! 11. deny all filesystem access ([`landlock`])
//! 12. the allowlist for the frontend, on all threads ([`seccomp`])
//!
//! [`confine`] must run while the process is single-threaded.

pub mod caps;
pub mod dumpable;
pub mod env;
pub mod fds;
pub mod ids;
pub mod landlock;
pub mod mlock;
pub mod mount;
pub mod nnp;
pub mod ns;
pub mod rings;
pub mod rlimit;
pub mod seccomp;
pub mod sole_uid;

pub use ids::Ids;

use std::os::fd::{FromRawFd, RawFd};
use tapjail_common::proto::FrontendKind;

/// The uid/gid a worker started as root drops to when not told otherwise.
pub const NOBODY: Ids = Ids {
    uid: 65534,
    gid: 65534,
};

/// What the worker is confined to.
#[derive(Debug, Clone)]
pub struct Policy {
    /// fds that survive step 1 (stdio, the control socket, ...).
    pub keep_fds: Vec<RawFd>,
    /// ids to switch to; `None` keeps the current (non-root) ids.
    pub ids: Option<Ids>,
    /// Chooses the seccomp rule set.
    pub frontend: FrontendKind,
    /// The io_uring rings to make before seccomp.
    pub rings: rings::RingPlan,
    /// `ids.uid` was chosen unused by the spawner (see
    /// [`rlimit::Limits::fresh_uid`]); checked in step 9 ([`sole_uid`]).
    pub fresh_uid: bool,
    /// A mount namespace with an empty root, and that root's directory, to
    /// join in step 5 instead of building one ([`mount::join`]); both must
    /// be on the keep list, and are closed once joined.
    pub root_ns: Option<[RawFd; 2]>,
}

impl Policy {
    /// The ids to run as: `requested`, or [`NOBODY`] when running as root,
    /// or none (stay) when not root. Refuses a switch we cannot make.
    pub fn choose_ids(requested: Option<Ids>) -> Result<Option<Ids>, SandboxError> {
        let (_, euid, _) = ids::current_uids();
        match (requested, euid) {
            (Some(ids), 0) => Ok(Some(ids)),
            (None, 0) => Ok(Some(NOBODY)),
            (None, _) => Ok(None),
            (Some(ids), me) => {
                let (_, egid, _) = ids::current_gids();
                if ids.uid == me && ids.gid == egid {
                    Ok(None)
                } else {
                    Err(SandboxError::Ids(ids::IdsError::Syscall {
                        step: "switching uid/gid needs root",
                        source: std::io::Error::from_raw_os_error(libc::EPERM),
                    }))
                }
            }
        }
    }
}

/// The confinement step that failed; every message names the step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("confinement step 1 (close stray fds): {0}")]
    Fds(#[source] std::io::Error),
    #[error("confinement step 3 (rlimits): {0}")]
    Rlimit(#[from] rlimit::RlimitError),
    #[error("confinement step 4 (namespaces): {0}")]
    Namespaces(#[from] ns::NsError),
    #[error("confinement step 5 (empty root): {0}")]
    EmptyRoot(#[from] mount::MountError),
    #[error("confinement step 6 (io_uring rings): {0}")]
    Rings(#[source] std::io::Error),
    #[error("confinement step 7 (mlockall): {0}")]
    Mlock(#[from] mlock::MlockError),
    #[error("confinement step 8 (uid/gid): {0}")]
    Ids(#[from] ids::IdsError),
    #[error("confinement step 8 (PR_SET_DUMPABLE 0): {0}")]
    Dumpable(#[source] std::io::Error),
    #[error("confinement step 9 (capabilities): {0}")]
    Caps(#[from] caps::CapsError),
    #[error("confinement step 9 (uid not shared): {0}")]
    SoleUid(#[from] sole_uid::SoleUidError),
    #[error("confinement step 10 (no_new_privs): {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("confinement step 11 (landlock): {0}")]
    Landlock(#[from] landlock::LandlockError),
    #[error("confinement step 12 (seccomp): {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Run every step, in order. On error the process is partly confined and
/// must exit.
pub fn confine(policy: &Policy) -> Result<(), SandboxError> {
    confine_timed(policy).map(drop)
}

/// How long each confinement step took, in order (for the broker's phase
/// lines, `tapdisk --phases`).
pub type StepTimes = Vec<(&'static str, std::time::Duration)>;

/// [`confine`], timing each step: a clock read between steps (vDSO, no
/// syscall), so the confinement is the same with or without the report.
pub fn confine_timed(policy: &Policy) -> Result<StepTimes, SandboxError> {
    let mut times = StepTimes::with_capacity(12);
    let mut last = std::time::Instant::now();
    let mut lap = |name: &'static str| {
        let now = std::time::Instant::now();
        times.push((name, now - last));
        last = now;
    };
    fds::close_all_except(&policy.keep_fds).map_err(SandboxError::Fds)?;
    env::clear();
    lap("fds_env");
    let uid = match policy.ids {
        Some(ids) => ids.uid,
        None => ids::current_uids().0,
    };
    rlimit::apply(&rlimit::Limits {
        uid,
        memlock_min: mlock::MEMLOCK_NEEDED,
        fresh_uid: policy.fresh_uid,
    })?;
    lap("rlimits");
    // Read after the root is gone, by the mlock step; closed after it.
    let status = std::fs::File::open("/proc/self/status").ok();
    // SAFETY: the fd is on the keep list, so open, and ours alone (the
    // policy hands it to this step).
    let root_ns = policy
        .root_ns
        .map(|fds| fds.map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
    if ns::isolate(root_ns.is_some())?.is_empty() {
        drop(root_ns); // not root: the host's namespaces are all we have
    } else {
        lap("namespaces");
        match root_ns {
            Some([ns, dir]) => mount::join(ns, dir)?,
            None => mount::empty_root()?,
        }
        lap("empty_root");
    }
    rings::prepare(&policy.rings).map_err(SandboxError::Rings)?;
    lap("rings");
    mlock::lock_all(status.as_ref())?;
    drop(status);
    lap("mlockall");
    if let Some(ids) = policy.ids {
        ids::switch_to(ids)?;
    }
    dumpable::off().map_err(SandboxError::Dumpable)?;
    caps::drop_all()?;
    if let (true, Some(ids)) = (policy.fresh_uid, policy.ids) {
        sole_uid::check(ids.uid)?;
    }
    nnp::set().map_err(SandboxError::NoNewPrivs)?;
    lap("ids_caps_nnp");
    landlock::deny_all()?;
    lap("landlock");
    seccomp::install(policy.frontend)?;
    lap("seccomp");
    Ok(times)
}
