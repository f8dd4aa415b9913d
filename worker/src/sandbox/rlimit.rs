//! Step 3: resource limits.
//!
//! - `RLIMIT_NOFILE`: a fixed small table; the worker never needs more than
//!   its image chain, its rings and its clients.
//! - `RLIMIT_CORE` = 0: a crashing worker must not write image contents to
//!   disk (not dumpable, see `super::dumpable`, also stops core dumps).
//! - `RLIMIT_MEMLOCK`: raised to what the worker needs when we may (root,
//!   before the uid switch); otherwise left as the spawner set it, and the
//!   mlock step reports clearly if it is too small.
//! - `RLIMIT_NPROC`: **not 0**, deliberately. On Linux this limit counts
//!   threads, including the io_uring worker threads (io-wq) the kernel
//!   creates for us: with 0, `pthread_create` fails with EAGAIN and every
//!   io_uring request that must block (fsync, most writes) completes with
//!   ECANCELED (measured on this project's hosts). We set it to the tasks the
//!   target uid already has plus a fixed [`THREAD_BUDGET`], which bounds what
//!   a compromised worker can spawn; that it cannot create a *process* at all
//!   is enforced by seccomp (clone is allowed only with thread flags, fork,
//!   vfork and clone3 are refused).
//!
//! Every limit is set with soft = hard, so a compromised worker cannot
//! raise it again (that needs `CAP_SYS_RESOURCE`, which it no longer has).

use std::io;

/// Threads (ours and the kernel's io-wq workers) a worker may have.
pub const THREAD_BUDGET: u64 = 512;
/// File descriptors a worker may have open.
pub const NOFILE: u64 = 1024;

/// What to set.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Real uid the worker will run as (its tasks count towards NPROC).
    pub uid: u32,
    /// Raise RLIMIT_MEMLOCK to at least this where permitted.
    pub memlock_min: u64,
    /// The spawner chose `uid` so that no process had it (the worker
    /// checks that in step 9, `super::sole_uid`, and refuses to run
    /// otherwise): the budget need not count others, which saves a read of
    /// every process's status (O(attached disks)).
    pub fresh_uid: bool,
}

/// Which limit failed, for the error message.
#[derive(Debug, thiserror::Error)]
#[error("setrlimit({resource}, {value}): {source}")]
pub struct RlimitError {
    pub resource: &'static str,
    pub value: u64,
    #[source]
    pub source: io::Error,
}

pub fn apply(limits: &Limits) -> Result<(), RlimitError> {
    set(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    set(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", NOFILE)?;
    let others = if limits.fresh_uid {
        0
    } else {
        tasks_of_uid(limits.uid).unwrap_or(0)
    };
    set(
        libc::RLIMIT_NPROC,
        "RLIMIT_NPROC",
        others.saturating_add(THREAD_BUDGET),
    )?;
    let memlock = get(libc::RLIMIT_MEMLOCK);
    if memlock < limits.memlock_min {
        // Only root can raise a hard limit; otherwise keep what we were
        // given and let the mlock step explain.
        let _ = set(libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK", limits.memlock_min);
    }
    Ok(())
}

/// Current soft limit of `resource`.
pub fn get(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid out-pointer for the duration of the call.
    if unsafe { libc::getrlimit(resource, &mut r) } == 0 {
        r.rlim_cur
    } else {
        0
    }
}

fn set(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    value: u64,
) -> Result<(), RlimitError> {
    let r = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: r is a valid in-pointer for the duration of the call.
    if unsafe { libc::setrlimit(resource, &r) } == 0 {
        Ok(())
    } else {
        Err(RlimitError {
            resource: name,
            value,
            source: io::Error::last_os_error(),
        })
    }
}

/// Threads on the system whose real uid is `uid`, not counting ours.
fn tasks_of_uid(uid: u32) -> io::Result<u64> {
    let me = std::process::id().to_string();
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // The process may exit while we look; skip it then.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            total = total.saturating_add(field("Threads:").unwrap_or(1));
        }
    }
    Ok(total)
}
