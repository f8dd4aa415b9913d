//! How big the NBD server may grow, from the memory the worker may still
//! lock (see `sandbox::mlock`): every thread stack and every I/O buffer is
//! locked memory, and a mapping beyond RLIMIT_MEMLOCK fails. Sizing up
//! front turns a small limit into fewer threads, fewer clients and smaller
//! requests (the maximum block size we advertise) instead of allocation
//! failures under load.

use super::proto::MAX_PAYLOAD;

/// Stack of an I/O thread (runs the image engine). The deepest path (a
/// VHD chain read/write through io_uring, debug build) ran in 24 KiB; this
/// leaves more than twice that.
pub const IO_STACK: usize = 64 * 1024;
/// Stack of a connection's reader or writer thread (parsing and copying;
/// ran in 20 KiB in a debug build).
pub const CONN_STACK: usize = 48 * 1024;
/// Buffered reading of one connection's request headers and small
/// payloads (the reader's `BufReader`).
pub const READ_BUFFER: usize = 128 * 1024;
/// Threads besides the I/O pool that run the image engine: the paced
/// lanes of the I/O limits (`ServerCtx::paced`).
const PACED_THREADS: u64 = 2;
/// Kept free for the image engine's own allocations and the heap.
const RESERVE: u64 = 1 << 20;
/// Per-thread overhead besides the stack (guard page, TLS, tcache).
const THREAD_OVERHEAD: u64 = 16 * 1024;
/// Smallest maximum block size we advertise.
const MIN_PAYLOAD: u32 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    pub io_threads: usize,
    pub max_connections: usize,
    /// Largest READ/WRITE payload (advertised maximum block size).
    pub max_payload: u32,
    /// Payload bytes in flight over all connections.
    pub inflight_bytes: u64,
    /// Idle buffers kept for reuse.
    pub idle_bytes: usize,
}

impl Sizing {
    /// Without a memory limit (not confined, or unlimited).
    pub const UNLIMITED: Sizing = Sizing {
        io_threads: 32,
        max_connections: 32,
        max_payload: MAX_PAYLOAD,
        inflight_bytes: 128 << 20,
        idle_bytes: 64 << 20,
    };

    /// Plan for `headroom` bytes of lockable memory (`None`: no limit).
    pub fn plan(headroom: Option<u64>) -> Sizing {
        let Some(room) = headroom else {
            return Sizing::UNLIMITED;
        };
        let u = Sizing::UNLIMITED;
        let room = room.saturating_sub(RESERVE);
        let io_cost = IO_STACK as u64 + THREAD_OVERHEAD;
        let room = room.saturating_sub(PACED_THREADS * io_cost);
        let conn_cost = conn_cost();
        let clamp = |n: u64, lo: usize, hi: usize| (n as usize).clamp(lo, hi);
        let io_threads = clamp(room / 2 / io_cost, 2, u.io_threads);
        let max_connections = clamp(room / 6 / conn_cost, 2, u.max_connections);
        let threads = io_threads as u64 * io_cost + max_connections as u64 * conn_cost;
        let left = room.saturating_sub(threads);
        let inflight_bytes = (left / 2).clamp(2 * u64::from(MIN_PAYLOAD), u.inflight_bytes);
        let idle_bytes = (left / 4).min(u.idle_bytes as u64) as usize;
        let half = (inflight_bytes / 2).min(u64::from(MAX_PAYLOAD));
        // Largest power of two ≤ half (half ≥ MIN_PAYLOAD by the clamp above).
        let max_payload = 1u32 << (63 - half.leading_zeros()).min(31);
        Sizing {
            io_threads,
            max_connections,
            max_payload: max_payload.max(MIN_PAYLOAD),
            inflight_bytes,
            idle_bytes,
        }
    }
}

/// What one connected client locks besides the shared pools: its reader
/// thread, the writer thread it starts once its socket fills, and the
/// reader's buffer. Planning with less let a few concurrent clients push
/// the worker past RLIMIT_MEMLOCK, where the next allocation aborts it
/// (under `mlockall` every mapping is locked), killing the disk.
pub fn conn_cost() -> u64 {
    2 * (CONN_STACK as u64 + THREAD_OVERHEAD) + READ_BUFFER as u64
}

impl Sizing {
    /// This plan, taking requests of at least `min` bytes: the kernel nbd
    /// client sends up to its queue's limit and cannot be told a smaller
    /// maximum block size, so the budget grows to fit two of them.
    pub fn with_min_payload(self, min: u32) -> Sizing {
        if self.max_payload >= min {
            return self;
        }
        Sizing {
            max_payload: min,
            inflight_bytes: self.inflight_bytes.max(2 * u64::from(min)),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_without_limit_is_the_full_size() {
        assert_eq!(Sizing::plan(None), Sizing::UNLIMITED);
        assert_eq!(Sizing::plan(Some(u64::MAX)), Sizing::UNLIMITED);
    }

    #[test]
    fn plan_for_a_small_limit_fits_inside_it() {
        for room in [2u64 << 20, 4 << 20, 8 << 20, 64 << 20] {
            let s = Sizing::plan(Some(room));
            let threads = (s.io_threads as u64 + PACED_THREADS)
                * (IO_STACK as u64 + THREAD_OVERHEAD)
                + s.max_connections as u64 * conn_cost();
            let total = threads + s.inflight_bytes + s.idle_bytes as u64 + RESERVE;
            assert!(
                total <= room.max(RESERVE + threads + 2 * u64::from(MIN_PAYLOAD)),
                "{room}: {s:?}"
            );
            assert!(
                s.max_payload.is_power_of_two() && s.max_payload >= MIN_PAYLOAD,
                "{s:?}"
            );
            assert!(u64::from(s.max_payload) <= s.inflight_bytes, "{s:?}");
            assert!(s.io_threads >= 2 && s.max_connections >= 2);
        }
        let s = Sizing::plan(Some(512 << 20));
        assert_eq!(s.io_threads, 32);
        assert_eq!(s.with_min_payload(1 << 20), s, "already big enough");
        let small = Sizing::plan(Some(2 << 20)).with_min_payload(1 << 20);
        assert_eq!(small.max_payload, 1 << 20);
        assert!(small.inflight_bytes >= 2 << 20, "{small:?}");
        assert_eq!(s.max_payload, MAX_PAYLOAD);
    }
}
