//! I/O limits, enforced in the request path of every frontend.
//!
//! [`crate::disk::Disk`] asks its [`Throttle`] before a read or a write
//! reaches the image: a request over the limit is delayed (its thread
//! sleeps until its slot; ublk's queue hands it to a slow-path thread
//! first, so the queue ring keeps completing others), never failed. Each
//! direction has up to four buckets — this disk's IOPS and bytes, and its
//! tenant's, shared with the tenant's other workers ([`shared`]) — and a
//! request takes its tokens from all of them at once and waits for the
//! latest slot. Flushes, discards and block-status queries pass freely,
//! as in qemu's throttle groups.
//!
//! A worker enforces its own limits, so a compromised worker can ignore
//! them; what it cannot do is touch another tenant's budget (it never has
//! that tenant's memfd). The kernel-enforced backstop is the cgroup
//! `io.weight` / `io.max` of the worker's cgroup where cgroup v2 exists.

pub mod gcra;
pub mod shared;

use gcra::Shape;
use shared::SharedCells;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tapjail_common::qos::{IoLimits, Knob, ThrottleStats};

/// Threads a frontend runs for delayed requests: one per [`Dir`], so a
/// direction out of tokens holds up only itself.
pub const PACED_LANES: usize = 2;

/// Which way a request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Read => 0,
            Dir::Write => 1,
        }
    }

    /// The (knob index, cost) pairs a request of `bytes` takes from.
    fn costs(self, bytes: u64) -> [(usize, u64); 2] {
        match self {
            Dir::Read => [(0, 1), (2, bytes)],
            Dir::Write => [(1, 1), (3, bytes)],
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// host, which the shared tenant buckets need (an `Instant` is opaque).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nsecs = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// The shapes of one scope's four buckets (rate 0: no limit). Atomics so
/// that the request path reads them without a lock while the control
/// thread changes them.
#[derive(Debug, Default)]
struct Shapes {
    rate: [AtomicU64; 4],
    burst: [AtomicU64; 4],
}

impl Shapes {
    fn get(&self, i: usize) -> Option<Shape> {
        let rate = self.rate[i].load(Relaxed);
        (rate != 0).then(|| Shape {
            rate,
            burst: self.burst[i].load(Relaxed),
        })
    }

    /// Store `limits`; returns which knobs changed.
    fn store(&self, limits: &IoLimits) -> [bool; 4] {
        let mut changed = [false; 4];
        for (i, k) in Knob::ALL.iter().enumerate() {
            let (rate, burst) = limits.get(*k).map_or((0, 0), |r| (r.per_sec, r.burst));
            changed[i] = self.rate[i].swap(rate, Relaxed) != rate;
            changed[i] |= self.burst[i].swap(burst, Relaxed) != burst;
        }
        changed
    }
}

#[derive(Debug, Default)]
struct DirStats {
    paced: AtomicU64,
    delayed: AtomicU64,
    delay_ns: AtomicU64,
    max_delay_ns: AtomicU64,
    first_release_ns: AtomicU64,
    last_release_ns: AtomicU64,
}

/// Why limits could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error("invalid limits: {0}")]
    Invalid(String),
    #[error("tenant limits need the tenant's bucket file, which the broker did not pass")]
    NoTenantBucket,
    #[error("mapping the tenant's bucket file: {0}")]
    Map(std::io::Error),
}

/// A disk's limits and buckets. Shared by the disk (request path) and the
/// control thread (changes, stats); outlives pause/unpause.
pub struct Throttle {
    /// Any knob limited: the unlimited path is one load.
    enabled: AtomicBool,
    disk: Shapes,
    tenant: Shapes,
    disk_cells: [AtomicU64; 4],
    /// The tenant's shared cells; replaced when the broker passes another
    /// file (a restarted broker made a new one for the tenant).
    tenant_cells: RwLock<Option<Arc<SharedCells>>>,
    limits: Mutex<(IoLimits, IoLimits)>,
    stats: [DirStats; 2],
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    /// Bumped to cut every sleep short (close).
    wake: (Mutex<u64>, Condvar),
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("enabled", &self.enabled)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::with_clock(Box::new(monotonic_ns))
    }
}

impl Throttle {
    /// No limits, on `clock` (ns; the tests drive it by hand).
    pub fn with_clock(clock: Box<dyn Fn() -> u64 + Send + Sync>) -> Throttle {
        Throttle {
            enabled: AtomicBool::new(false),
            disk: Shapes::default(),
            tenant: Shapes::default(),
            disk_cells: Default::default(),
            tenant_cells: RwLock::new(None),
            limits: Mutex::new((IoLimits::default(), IoLimits::default())),
            stats: Default::default(),
            clock,
            wake: (Mutex::new(0), Condvar::new()),
        }
    }

    /// Enforce `disk` and `tenant` from now on. `bucket` is the tenant's
    /// memfd: mapped unless it is the file mapped already (a worker serves
    /// one tenant for life, but a restarted broker makes the tenant a new
    /// file and hands it to all her workers at the next change). Debt left
    /// by older, slower shapes is forgiven.
    pub fn set(
        &self,
        disk: IoLimits,
        tenant: IoLimits,
        bucket: Option<OwnedFd>,
    ) -> Result<(), ThrottleError> {
        disk.check().map_err(ThrottleError::Invalid)?;
        tenant.check().map_err(ThrottleError::Invalid)?;
        if let Some(fd) = bucket {
            let same = self.cells().is_some_and(|c| c.same_file(&fd));
            if !same {
                let cells = SharedCells::map(fd).map_err(ThrottleError::Map)?;
                *self.tenant_cells.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(Arc::new(cells));
            }
        }
        if !tenant.is_unlimited() && self.cells().is_none() {
            return Err(ThrottleError::NoTenantBucket);
        }
        let mut held = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let now = (self.clock)();
        for (i, changed) in self.disk.store(&disk).into_iter().enumerate() {
            if changed {
                gcra::forgive(&self.disk_cells[i], now);
            }
        }
        let changed = self.tenant.store(&tenant);
        if let Some(cells) = self.cells() {
            for (i, changed) in changed.into_iter().enumerate() {
                if changed {
                    gcra::forgive(cells.cell(i), now);
                }
            }
        }
        *held = (disk, tenant);
        self.enabled
            .store(!(disk.is_unlimited() && tenant.is_unlimited()), Relaxed);
        Ok(())
    }

    fn cells(&self) -> Option<Arc<SharedCells>> {
        self.tenant_cells
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every bucket a request of `bytes` in `dir` takes from (`tenant`:
    /// the tenant's cells, see [`Throttle::cells`]).
    fn buckets<'a>(
        &'a self,
        dir: Dir,
        bytes: u64,
        tenant: Option<&'a SharedCells>,
    ) -> impl Iterator<Item = (&'a AtomicU64, u64, Shape)> {
        dir.costs(bytes).into_iter().flat_map(move |(i, cost)| {
            let own = self.disk.get(i).map(|s| (&self.disk_cells[i], cost, s));
            let shared = tenant.and_then(|c| self.tenant.get(i).map(|s| (c.cell(i), cost, s)));
            own.into_iter().chain(shared)
        })
    }

    /// Whether a request would go at once (takes nothing).
    pub fn ready(&self, dir: Dir, bytes: u64) -> bool {
        if !self.enabled.load(Relaxed) {
            return true;
        }
        let now = (self.clock)();
        let tenant = self.cells();
        let ready = self
            .buckets(dir, bytes, tenant.as_deref())
            .all(|(cell, cost, s)| gcra::peek(cell, now, cost, s) == 0);
        ready
    }

    /// Take a request's tokens and count it; returns how long (ns) it
    /// must wait. 0 when nothing is limited.
    pub fn take(&self, dir: Dir, bytes: u64) -> u64 {
        if !self.enabled.load(Relaxed) {
            return 0;
        }
        let now = (self.clock)();
        let mut wait = None;
        let tenant = self.cells();
        for (cell, cost, s) in self.buckets(dir, bytes, tenant.as_deref()) {
            let w = gcra::reserve(cell, now, cost, s);
            wait = Some(wait.unwrap_or(0).max(w));
        }
        let Some(wait) = wait else {
            return 0; // this direction is not limited
        };
        let st = &self.stats[dir.index()];
        st.paced.fetch_add(1, Relaxed);
        if wait > 0 {
            st.delayed.fetch_add(1, Relaxed);
            st.delay_ns.fetch_add(wait, Relaxed);
            st.max_delay_ns.fetch_max(wait, Relaxed);
        }
        let release = now.saturating_add(wait);
        let _ = st
            .first_release_ns
            .compare_exchange(0, release, Relaxed, Relaxed);
        st.last_release_ns.fetch_max(release, Relaxed);
        wait
    }

    /// Take a request's tokens and sleep until its slot. The sleep ends
    /// early only when [`Throttle::interrupt`] is called (the disk closes).
    pub fn admit(&self, dir: Dir, bytes: u64) {
        let wait = self.take(dir, bytes);
        if wait > 0 {
            self.sleep(Duration::from_nanos(wait));
        }
    }

    fn sleep(&self, d: Duration) {
        self.sleep_until(Instant::now() + d);
    }

    /// Sleep until `deadline`; cut short by [`Throttle::interrupt`].
    pub fn sleep_until(&self, deadline: Instant) {
        self.sleep_from(self.interrupts(), deadline);
    }

    /// How many times [`Throttle::interrupt`] was called: a sleep from
    /// this count ends at the next one, even if it came before the sleep.
    pub fn interrupts(&self) -> u64 {
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleep until `deadline` unless interrupted after `start` (a value
    /// of [`Throttle::interrupts`]).
    pub fn sleep_from(&self, start: u64, deadline: Instant) {
        let (lock, cv) = &self.wake;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *g == start {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Cut every sleeping request short (the disk is closing: they fail
    /// fast instead of waiting out their slot).
    pub fn interrupt(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// The limits in force and the delays so far.
    pub fn stats(&self) -> ThrottleStats {
        let (disk, tenant) = *self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let pair = |f: &dyn Fn(&DirStats) -> u64| [f(&self.stats[0]), f(&self.stats[1])];
        ThrottleStats {
            disk,
            tenant,
            paced: pair(&|s| s.paced.load(Relaxed)),
            delayed: pair(&|s| s.delayed.load(Relaxed)),
            delay_us: pair(&|s| s.delay_ns.load(Relaxed) / 1000),
            max_delay_us: pair(&|s| s.max_delay_ns.load(Relaxed) / 1000),
            first_release_us: pair(&|s| s.first_release_ns.load(Relaxed) / 1000),
            last_release_us: pair(&|s| s.last_release_ns.load(Relaxed) / 1000),
        }
    }
}

#[cfg(test)]
mod tests;
