//! Step 4: `mlockall(MCL_CURRENT | MCL_FUTURE)`.
//!
//! Image data and the worker's state never reach swap, where they would
//! outlive the worker and be readable by whoever reads the swap device.
//! Before locking we cap glibc's malloc arenas: each arena reserves 64 MiB of
//! address space, and with `MCL_FUTURE` reservations count against
//! `RLIMIT_MEMLOCK` even before they are touched.

use std::io;

/// What a worker should be allowed to lock: code, heap, thread stacks, I/O
/// buffers for requests in flight. The broker sets RLIMIT_MEMLOCK to at
/// least this; standalone mode as root raises it itself.
pub const MEMLOCK_NEEDED: u64 = 512 << 20;

/// glibc's `M_ARENA_MAX` mallopt parameter.
const M_ARENA_MAX: libc::c_int = -8;
/// Arenas: the main one plus one for the worker threads to share.
const ARENAS: libc::c_int = 2;

#[derive(Debug, thiserror::Error)]
pub enum MlockError {
    #[error(
        "mlockall(MCL_CURRENT|MCL_FUTURE) failed ({source}): RLIMIT_MEMLOCK is {limit} bytes but the \
         worker maps {mapped} bytes now and needs up to {needed} bytes to serve; raise RLIMIT_MEMLOCK \
         to at least {needed} bytes (e.g. `ulimit -l {needed_kib}`, or run as root so tapdisk raises it)"
    )]
    TooSmall {
        limit: u64,
        mapped: u64,
        needed: u64,
        needed_kib: u64,
        #[source]
        source: io::Error,
    },
    #[error("mlockall(MCL_CURRENT|MCL_FUTURE) failed: {0}")]
    Other(#[source] io::Error),
}

pub fn lock_all() -> Result<(), MlockError> {
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(M_ARENA_MAX, ARENAS) };
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::EAGAIN) | Some(libc::EPERM) => {
            let mapped = vm_size().unwrap_or(0);
            let needed = MEMLOCK_NEEDED.max(mapped.saturating_mul(2));
            Err(MlockError::TooSmall {
                limit: super::rlimit::get(libc::RLIMIT_MEMLOCK),
                mapped,
                needed,
                needed_kib: needed.div_ceil(1024),
                source,
            })
        }
        _ => Err(MlockError::Other(source)),
    }
}

/// `VmSize` of this process in bytes (what MCL_CURRENT is checked against).
fn vm_size() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
