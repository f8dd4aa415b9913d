//! The engine's share of a worker's locked memory.
//!
//! A worker runs under `mlockall` with a small RLIMIT_MEMLOCK: an
//! allocation past it fails, and Rust aborts the process. The engine's
//! long-lived memory grows with the image (the BAT, two bits per block,
//! the cache of sector bitmaps, whose entries grow with the block size),
//! so a legal image could take more than a worker has: 2040 GiB in 4 MiB
//! blocks is 2 MiB of BAT and, uncapped, 4 MiB of cached bitmaps.
//!
//! So each VHD layer reserves what it needs at open from one process-wide
//! budget, which the worker sets after locking its memory (elsewhere it is
//! unlimited): the fixed part must fit or the open is refused, naming the
//! image, the need and the policy key to raise; the bitmap cache gets a
//! share of what is left, never less than a small floor. The frontends
//! size their threads and buffers from what the engine did not take
//! ([`committed`]).

use crate::ImageError;
use std::sync::atomic::{AtomicU64, Ordering};

/// A budget and what is reserved from it.
#[derive(Debug)]
pub struct Budget {
    limit: AtomicU64,
    committed: AtomicU64,
}

/// The process's budget.
static GLOBAL: Budget = Budget::new(u64::MAX);

/// Limit what opened images may hold to `bytes` (the worker: its locked
/// memory headroom less what its frontend needs at least).
pub fn set_budget(bytes: u64) {
    GLOBAL.limit.store(bytes, Ordering::Relaxed);
}

/// Bytes open images hold now.
pub fn committed() -> u64 {
    GLOBAL.committed.load(Ordering::Relaxed)
}

/// Reserve from the process's budget (see [`Budget::reserve`]).
pub fn reserve(name: &str, need: Need, what: &str) -> Result<(Reservation, u64), ImageError> {
    GLOBAL.reserve(name, need, what)
}

/// Memory held for one open layer; given back when the layer is dropped.
#[derive(Debug)]
pub struct Reservation {
    from: &'static Budget,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.from.committed.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What one layer asks for.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// Held for the layer's life whatever it serves (tables).
    pub fixed: u64,
    /// The least cache it can serve with, and what it would use at most.
    pub cache_min: u64,
    pub cache_max: u64,
}

impl Budget {
    pub const fn new(limit: u64) -> Budget {
        Budget {
            limit: AtomicU64::new(limit),
            committed: AtomicU64::new(0),
        }
    }

    /// Reserve `need` for image `name`; returns the reservation and the
    /// cache bytes granted: half of what is left after the fixed part (the
    /// rest for parents opened next and the frontend), within
    /// `cache_min..=cache_max`. `what` describes the fixed part for the
    /// error.
    pub fn reserve(
        &'static self,
        name: &str,
        need: Need,
        what: &str,
    ) -> Result<(Reservation, u64), ImageError> {
        let limit = self.limit.load(Ordering::Relaxed);
        let least = need.fixed.saturating_add(need.cache_min);
        let mut granted = 0;
        self.committed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                let left = limit.saturating_sub(c);
                if least > left {
                    return None;
                }
                let cache = ((left - need.fixed) / 2).clamp(need.cache_min, need.cache_max);
                granted = cache;
                Some(c + need.fixed + cache)
            })
            .map_err(|c| too_big(name, least, limit.saturating_sub(c), what))?;
        Ok((
            Reservation {
                from: self,
                bytes: need.fixed + granted,
            },
            granted,
        ))
    }
}

fn too_big(name: &str, need: u64, left: u64, what: &str) -> ImageError {
    let short_mib = (need - left).div_ceil(1 << 20);
    ImageError::Unsupported(format!(
        "{name} needs {} KiB of locked memory to be served ({what}), but this worker has {} KiB \
         left for images under its RLIMIT_MEMLOCK: raise worker_memlock_mib in the broker's \
         policy by at least {short_mib} MiB (tap-broker needs CAP_SYS_RESOURCE, or a hard \
         RLIMIT_MEMLOCK that high, to grant it), or use an image with larger blocks",
        need.div_ceil(1024),
        left / 1024
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_what_does_not_fit_shrinks_caches_and_gives_back() {
        let need = |fixed| Need {
            fixed,
            cache_min: 10,
            cache_max: 1000,
        };
        let budget: &'static Budget = Box::leak(Box::new(Budget::new(1100)));
        let used = || budget.committed.load(Ordering::Relaxed);
        let (a, cache) = budget.reserve("a.vhd", need(100), "a table").unwrap();
        assert_eq!(cache, 500, "half of what the fixed part leaves");
        assert_eq!(used(), 600);
        let (b, cache) = budget.reserve("b.vhd", need(100), "a table").unwrap();
        assert_eq!(cache, 200);
        let err = budget
            .reserve("c.vhd", need(195), "a 195-byte table")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.vhd needs 1 KiB")
                && err.contains("a 195-byte table")
                && err.contains("worker_memlock_mib"),
            "{err}"
        );
        assert_eq!(used(), 900, "a refusal reserves nothing");
        drop((a, b));
        assert_eq!(used(), 0);
        let unlimited: &'static Budget = Box::leak(Box::new(Budget::new(u64::MAX)));
        let (r, cache) = unlimited.reserve("d.vhd", need(1 << 40), "big").unwrap();
        assert_eq!(cache, 1000, "unlimited: the most a cache uses");
        drop(r);
    }
}
