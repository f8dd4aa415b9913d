//! Confinement of a worker, applied before the first byte of image data is
//! parsed. Each step is its own module; [`confine`] runs them in order:
//!
//! 1. close every fd not on the keep list ([`fds`])
//! 2. clear the environment ([`env`](mod@env))
//! 3. NOFILE, NPROC (a thread budget, see there), CORE=0, MEMLOCK; not
//!    dumpable ([`rlimit`])
//! 4. `mlockall(MCL_CURRENT|MCL_FUTURE)` ([`mlock`])
//! 5. new IPC/UTS/network namespaces where permitted ([`ns`]), then
//!    setgroups/setgid/setuid to the worker's own ids ([`ids`])
//! 6. drop every capability, lock the securebits ([`caps`])
//! 7. `PR_SET_NO_NEW_PRIVS` ([`nnp`])
//! 8. deny all filesystem access ([`landlock`])
//! 9. the allowlist for the frontend, on all threads ([`seccomp`])
//!
//! and then, per io_uring ring as it is created, `IORING_REGISTER_RESTRICTIONS`
//! (see `crate::io::ring`), because io_uring operations bypass seccomp.
//!
//! [`confine`] must run while the process is single-threaded.

pub mod caps;
pub mod env;
pub mod fds;
pub mod ids;
pub mod landlock;
pub mod mlock;
pub mod nnp;
pub mod ns;
pub mod rlimit;
pub mod seccomp;

pub use ids::Ids;

use std::os::fd::RawFd;
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
    #[error("confinement step 4 (mlockall): {0}")]
    Mlock(#[from] mlock::MlockError),
    #[error("confinement step 5 (uid/gid): {0}")]
    Ids(#[from] ids::IdsError),
    #[error("confinement step 6 (capabilities): {0}")]
    Caps(#[from] caps::CapsError),
    #[error("confinement step 7 (no_new_privs): {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("confinement step 8 (landlock): {0}")]
    Landlock(#[from] landlock::LandlockError),
    #[error("confinement step 9 (seccomp): {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Run every step, in order. On error the process is partly confined and
/// must exit.
pub fn confine(policy: &Policy) -> Result<(), SandboxError> {
    fds::close_all_except(&policy.keep_fds).map_err(SandboxError::Fds)?;
    env::clear();
    let uid = match policy.ids {
        Some(ids) => ids.uid,
        None => ids::current_uids().0,
    };
    rlimit::apply(&rlimit::Limits {
        uid,
        memlock_min: mlock::MEMLOCK_NEEDED,
    })?;
    mlock::lock_all()?;
    ns::isolate();
    if let Some(ids) = policy.ids {
        ids::switch_to(ids)?;
    }
    caps::drop_all()?;
    nnp::set().map_err(SandboxError::NoNewPrivs)?;
    landlock::deny_all()?;
    seccomp::install(policy.frontend)?;
    Ok(())
}
