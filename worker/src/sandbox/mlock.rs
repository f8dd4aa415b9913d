//! Step 7: `mlockall(MCL_CURRENT | MCL_FUTURE)`.
//!
//! Image data and the worker's state never reach swap, where they would
//! outlive the worker and be readable by whoever reads the swap device.
//!
//! With `MCL_FUTURE`, every later mapping (heap growth, thread stacks, I/O
//! buffers) is locked too, and once capabilities are dropped each new
//! mapping must fit under `RLIMIT_MEMLOCK` or fail. So this step also
//! records how much room is left ([`headroom`]); the open image reserves
//! its tables and caches from that (less [`FRONTEND_FLOOR`]) or is refused
//! at open, the frontends size their threads and buffers from what it
//! left instead of failing mid-request, and if the
//! room is below [`MIN_HEADROOM`] the worker refuses to start, naming the
//! limit. Before locking we cap glibc's malloc at one arena: every extra
//! arena reserves 64 MiB of address space, all of which would count; and
//! fix its mmap threshold so that large buffers are unmapped when freed
//! instead of growing the heap for good (see [`MMAP_THRESHOLD`]).

use std::io;
use std::sync::OnceLock;

/// What a comfortable worker locks: code, heap, thread stacks, I/O buffers
/// for many requests in flight. The broker sets RLIMIT_MEMLOCK to this
/// where it can; standalone mode as root raises it itself when permitted.
pub const MEMLOCK_NEEDED: u64 = 512 << 20;
/// The least room a worker needs beyond what is locked at confinement
/// (heap for the image engine, a few threads, small I/O buffers).
pub const MIN_HEADROOM: u64 = 2 << 20;

/// What the smallest frontend needs beyond the image engine's tables and
/// caches: a serving thread or two with their stacks and one large I/O
/// buffer (FUSE: ~400 KiB; NBD: two I/O threads, two connections and 128
/// KiB in flight), with room for control frames. The engine's budget is
/// the headroom less this (see `tapjail_image::memory`).
pub const FRONTEND_FLOOR: u64 = 1 << 20;

/// glibc's `M_ARENA_MAX` mallopt parameter.
const M_ARENA_MAX: libc::c_int = -8;
/// One arena, shared by all threads (each still has its own tcache).
const ARENAS: libc::c_int = 1;
/// glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` mallopt parameters.
const M_MMAP_THRESHOLD: libc::c_int = -3;
const M_TRIM_THRESHOLD: libc::c_int = -1;
/// Allocations from this size up (I/O buffers, a connection's read
/// buffer) get their own mapping, unmapped again when freed. Setting it
/// turns off glibc's dynamic threshold, which after the first such buffer
/// is freed serves every later one from the heap; under `mlockall` the
/// heap only grows (freed chunks between live ones stay mapped and
/// locked), so each short-lived NBD client left ~136 KiB locked until an
/// allocation failed and the worker aborted. With a fixed threshold what
/// large buffers lock is what is live, which the frontends budget.
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;
/// Give free heap above this back at the top (the default, fixed so that
/// it stays put: setting the mmap threshold alone would leave it dynamic).
const TRIM_THRESHOLD: libc::c_int = 128 * 1024;

/// Room left under RLIMIT_MEMLOCK right after locking.
static HEADROOM: OnceLock<u64> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum MlockError {
    #[error(
        "RLIMIT_MEMLOCK is {limit} bytes but the worker has {locked} bytes locked and needs at least \
         {needed} bytes to serve; raise RLIMIT_MEMLOCK to at least {needed} bytes (e.g. `ulimit -l \
         {needed_kib}`; only a process with CAP_SYS_RESOURCE can raise the hard limit)"
    )]
    TooSmall {
        limit: u64,
        locked: u64,
        needed: u64,
        needed_kib: u64,
    },
    #[error("mlockall(MCL_CURRENT|MCL_FUTURE) failed: {0}")]
    Other(#[source] io::Error),
}

fn too_small(limit: u64, locked: u64) -> MlockError {
    let needed = locked.saturating_add(MIN_HEADROOM);
    MlockError::TooSmall {
        limit,
        locked,
        needed,
        needed_kib: needed.div_ceil(1024),
    }
}

/// `status` is this process's `/proc/self/status`, opened before the root
/// went empty (see `super::mount`); without it the locked size is unknown
/// and taken as 0.
pub fn lock_all(status: Option<&std::fs::File>) -> Result<(), MlockError> {
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(M_ARENA_MAX, ARENAS);
        libc::mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
    let limit = super::rlimit::get(libc::RLIMIT_MEMLOCK);
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            // MCL_CURRENT is checked against the whole address space.
            Some(libc::ENOMEM | libc::EAGAIN | libc::EPERM) => {
                too_small(limit, status_kib(status, "VmSize:").unwrap_or(0))
            }
            _ => MlockError::Other(e),
        });
    }
    let locked = status_kib(status, "VmLck:").unwrap_or(0);
    if limit != libc::RLIM_INFINITY && limit < locked.saturating_add(MIN_HEADROOM) {
        return Err(too_small(limit, locked));
    }
    let room = limit.saturating_sub(locked);
    let _ = HEADROOM.set(room);
    // Images opened from now on reserve their tables and caches from this
    // (see `tapjail_image::memory`); the rest is the frontend's.
    tapjail_image::memory::set_budget(room.saturating_sub(FRONTEND_FLOOR));
    Ok(())
}

/// Bytes that may still be locked (mapped) after confinement, less what
/// the open image holds and live [`Claim`]s hold; `None` when this process did not lock its memory
/// (tests, offline tools).
pub fn headroom() -> Option<u64> {
    HEADROOM.get().map(|room| {
        room.saturating_sub(tapjail_image::memory::committed())
            .saturating_sub(CLAIMED.load(std::sync::atomic::Ordering::Relaxed))
    })
}

static CLAIMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Locked memory set aside by something that lives beside the frontend
/// (a write mirror's buffer and thread), so a frontend sized after it
/// leaves it room. Given back on drop.
#[derive(Debug)]
pub struct Claim(u64);

/// Set `bytes` aside from [`headroom`].
pub fn claim(bytes: u64) -> Claim {
    CLAIMED.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    Claim(bytes)
}

impl Drop for Claim {
    fn drop(&mut self) {
        CLAIMED.fetch_sub(self.0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A `/proc/self/status` field in bytes (the file reports kB).
fn status_kib(file: Option<&std::fs::File>, field: &str) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 8192];
    let n = file?.read_at(&mut buf, 0).ok()?;
    let status = String::from_utf8_lossy(&buf[..n]);
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
