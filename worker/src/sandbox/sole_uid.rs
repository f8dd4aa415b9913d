//! Step 9b: nobody else on the host runs as the worker's uid.
//!
//! The broker picks a uid none of its own workers holds (its tables and
//! records, which survive its restarts), but it cannot see whether some
//! other process runs as that uid without reading every process's
//! `/proc` status, which costs more with every disk attached. The kernel
//! already counts each uid's tasks (for `RLIMIT_NPROC`), and refuses a new
//! task past the limit unless the caller holds `CAP_SYS_RESOURCE` or
//! `CAP_SYS_ADMIN`. So, once single-threaded, switched and without
//! capabilities, the worker lowers its soft `RLIMIT_NPROC` to 2 (itself and
//! one more) and starts a thread: the thread is refused (EAGAIN) exactly
//! when another task of the uid exists. One `clone`, whatever the host
//! runs. The soft limit goes back to the hard one after.
//!
//! Tasks in a child user namespace are counted under that namespace, not
//! here; the broker refuses worker uids in anyone's subordinate range
//! (`policy::uid_overlap`), which is where such tasks would come from.

use std::io;

/// The marker the broker looks for in a worker's error to pick another uid.
pub use tapjail_common::worker_proto::UID_TAKEN;

/// Why the check could not pass.
#[derive(Debug, thiserror::Error)]
pub enum SoleUidError {
    #[error(
        "{UID_TAKEN} uid {uid} is not the worker's alone: another process on this host runs as it"
    )]
    Taken { uid: u32 },
    #[error("{step}: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Check that this process (one thread, no capabilities, real uid `uid`)
/// is the only one running as `uid`.
pub fn check(uid: u32) -> Result<(), SoleUidError> {
    let (soft, hard) = get_nproc();
    set_nproc(2, hard).map_err(|source| SoleUidError::Syscall {
        step: "setrlimit(RLIMIT_NPROC, 2)",
        source,
    })?;
    let probe = std::thread::Builder::new()
        .name("uid-probe".into())
        .stack_size(64 * 1024)
        .spawn(|| {});
    let restored = set_nproc(soft, hard);
    match probe {
        Ok(t) => {
            let _ = t.join();
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            return Err(SoleUidError::Taken { uid });
        }
        Err(source) => {
            return Err(SoleUidError::Syscall {
                step: "starting the probe thread",
                source,
            })
        }
    }
    restored.map_err(|source| SoleUidError::Syscall {
        step: "restoring RLIMIT_NPROC",
        source,
    })
}

fn get_nproc() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid out-pointer for the duration of the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

fn set_nproc(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: r is a valid in-pointer for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &r) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
