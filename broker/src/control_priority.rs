//! Real-time priority for the control plane, within a CPU budget per
//! tenant.
//!
//! Why: with the tenants' I/O saturating every CPU, a create's request
//! thread waits for a CPU at each of its dozens of wake-ups (the worker's
//! answers, the FUSE mount, the loop device), and its median grew from 13
//! to 40-70 ms at 1000 disks on two CPUs. A raised nice value hardly
//! helps there (EEVDF lets the running task finish its slice first), and
//! neither did a short slice (tried in an earlier round); `SCHED_FIFO`
//! does: the thread runs the moment it wakes.
//!
//! Why a budget: a request runs the same code for every tenant, so at
//! real-time priority a tenant looping create and destroy would take CPU
//! from every other tenant's I/O ahead of the fair scheduler. Each
//! tenant's state-changing requests may run at `SCHED_FIFO` for at most
//! `control_priority_ms` of CPU per second (the thread's own CPU clock,
//! so a request that mostly waits costs little), all tenants together
//! for two and a half times that; past it, a request runs at the normal
//! priority until the budget refills. A request overdraws its bucket by
//! at most its own CPU time.
//!
//! Only the request's own thread is raised, with `SCHED_RESET_ON_FORK`:
//! nothing it starts (an image-open helper, a helper thread) inherits
//! the priority, so no code that reads a tenant's path runs at it. The
//! one exception is deliberate: a worker it spawns starts at the same
//! priority (its exec and confinement were 3 ms idle and 10-14 ms under
//! load), goes back to `SCHED_OTHER` itself as its last step before
//! seccomp, before it reads any image byte, and is killed by the broker
//! if any of its threads has not. Its start-up is not charged to the
//! budget: it is bounded (one per create, within the spawn deadline).
//! Requests that change nothing (list, stats) and refused ones stay at
//! the normal priority.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// All tenants together may use this many times one tenant's budget.
const TOTAL_FACTOR_TENTHS: u64 = 25;

/// The per-tenant and total budgets, in CPU microseconds that refill at
/// their capacity per second.
#[derive(Debug)]
pub struct ControlPriority {
    per_tenant_us: u64,
    total_us: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tenants: HashMap<String, Bucket>,
    total: Bucket,
    /// `sched_setscheduler` refused once (no CAP_SYS_NICE, or a
    /// container without real-time runtime): said once, then not tried.
    refused: bool,
}

/// A token bucket of CPU microseconds; may go negative (a request is
/// charged after it ran).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: i64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: u64, now: Instant) -> Self {
        Bucket {
            tokens: i64::try_from(capacity).unwrap_or(i64::MAX),
            at: now,
        }
    }

    /// Refill at `capacity` per second, up to `capacity`.
    fn refill(&mut self, capacity: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        let add = (elapsed.as_micros().min(u128::from(u64::MAX)) as u64).saturating_mul(capacity)
            / 1_000_000;
        let cap = i64::try_from(capacity).unwrap_or(i64::MAX);
        self.tokens = self
            .tokens
            .saturating_add(i64::try_from(add).unwrap_or(i64::MAX))
            .min(cap);
        self.at = now;
    }

    fn charge(&mut self, used: Duration) {
        let us = i64::try_from(used.as_micros()).unwrap_or(i64::MAX);
        self.tokens = self.tokens.saturating_sub(us);
    }
}

thread_local! {
    /// This thread runs a raised request now.
    static RAISED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread runs a request at real-time priority now
/// (a worker it spawns then starts at that priority too).
pub fn this_thread_raised() -> bool {
    RAISED.with(Cell::get)
}

/// A request running at real-time priority; dropped, the thread goes
/// back to the normal priority and the CPU it used is charged.
#[derive(Debug)]
pub struct Boost<'a> {
    owner: &'a ControlPriority,
    tenant: String,
    cpu_at_start: Duration,
}

impl ControlPriority {
    /// Budgets of `per_tenant_ms` CPU milliseconds a second (0: never
    /// raise a request).
    pub fn new(per_tenant_ms: u32) -> Self {
        let per_tenant_us = u64::from(per_tenant_ms) * 1000;
        let now = Instant::now();
        let total_us = per_tenant_us * TOTAL_FACTOR_TENTHS / 10;
        ControlPriority {
            per_tenant_us,
            total_us,
            state: Mutex::new(State {
                tenants: HashMap::new(),
                total: Bucket::full(total_us, now),
                refused: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `tenant` (and all tenants together) have budget left now.
    fn grant(&self, tenant: &str, now: Instant) -> bool {
        if self.per_tenant_us == 0 {
            return false;
        }
        let mut s = self.lock();
        if s.refused {
            return false;
        }
        let (per, total) = (self.per_tenant_us, self.total_us);
        s.total.refill(total, now);
        let b = s
            .tenants
            .entry(tenant.to_string())
            .or_insert_with(|| Bucket::full(per, now));
        b.refill(per, now);
        b.tokens > 0 && s.total.tokens > 0
    }

    fn charge(&self, tenant: &str, used: Duration) {
        let mut s = self.lock();
        s.total.charge(used);
        if let Some(b) = s.tenants.get_mut(tenant) {
            b.charge(used);
        }
    }

    /// Raise the calling thread for one of `tenant`'s requests, if the
    /// budgets allow; `None` runs it at the normal priority.
    pub fn enter(&self, tenant: &str) -> Option<Boost<'_>> {
        if !self.grant(tenant, Instant::now()) {
            return None;
        }
        if let Err(e) = set_this_thread(Policy::RealTime) {
            let mut s = self.lock();
            if !s.refused {
                s.refused = true;
                tracing::warn!(
                    "control_priority: cannot run requests at real-time priority ({e}); \
                     they run at the normal priority (set control_priority_ms = 0 to say so)"
                );
            }
            return None;
        }
        RAISED.with(|r| r.set(true));
        tapjail_broker::phases::lap("raised");
        Some(Boost {
            owner: self,
            tenant: tenant.to_string(),
            cpu_at_start: thread_cpu_time(),
        })
    }
}

impl Drop for Boost<'_> {
    fn drop(&mut self) {
        RAISED.with(|r| r.set(false));
        if let Err(e) = set_this_thread(Policy::Normal) {
            // The thread stays raised: end it rather than serve on at
            // real-time priority (its client sees the connection close).
            tracing::error!("control_priority: cannot lower a request thread again ({e})");
            std::process::abort();
        }
        let used = thread_cpu_time().saturating_sub(self.cpu_at_start);
        self.owner.charge(&self.tenant, used);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    RealTime,
    Normal,
}

/// The lowest `SCHED_FIFO` priority: above every fair-scheduled task,
/// below every real-time one the host runs.
const FIFO_PRIORITY: i32 = 1;

fn set_this_thread(p: Policy) -> std::io::Result<()> {
    let (policy, priority) = match p {
        Policy::RealTime => (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, FIFO_PRIORITY),
        Policy::Normal => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid, initialised
    // sched_param that outlives the call.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The calling thread's scheduling policy (for the tests).
#[cfg(test)]
fn this_thread_policy() -> i32 {
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_past_its_budget_waits_for_the_refill_and_others_are_not_charged() {
        let cp = ControlPriority::new(10); // 10 ms a second each
        let t0 = Instant::now();
        assert!(cp.grant("a", t0));
        cp.charge("a", Duration::from_millis(12));
        assert!(!cp.grant("a", t0), "overdrawn by 2 ms");
        assert!(cp.grant("b", t0), "b has its own bucket");
        // -2 ms, plus 200 ms of refill at 10 ms/s: zero, not above.
        assert!(!cp.grant("a", t0 + Duration::from_millis(200)));
        assert!(cp.grant("a", t0 + Duration::from_millis(300)));
    }

    #[test]
    fn all_tenants_together_stop_at_two_and_a_half_budgets() {
        let cp = ControlPriority::new(10);
        let t0 = Instant::now();
        for t in ["a", "b"] {
            assert!(cp.grant(t, t0));
            cp.charge(t, Duration::from_millis(10));
        }
        assert!(cp.grant("c", t0));
        cp.charge("c", Duration::from_millis(5));
        assert!(
            !cp.grant("d", t0),
            "25 ms of 25 used: d, fresh, still waits"
        );
    }

    #[test]
    fn a_full_bucket_holds_one_second_not_more() {
        let cp = ControlPriority::new(10);
        let t0 = Instant::now();
        assert!(cp.grant("a", t0));
        // An hour idle refills to 10 ms, not 36 s.
        let later = t0 + Duration::from_secs(3600);
        assert!(cp.grant("a", later));
        cp.charge("a", Duration::from_millis(11));
        assert!(!cp.grant("a", later));
    }

    #[test]
    fn zero_never_raises() {
        let cp = ControlPriority::new(0);
        assert!(cp.enter("a").is_none());
    }

    /// As root (CI): the thread runs at SCHED_FIFO while the boost lives
    /// and at SCHED_OTHER after it; its CPU is charged.
    #[test]
    fn a_boost_raises_this_thread_and_lowering_it_charges_the_cpu_used() {
        let cp = ControlPriority::new(100);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").is_err(),
                "CI runs as root: the real-time priority cannot be tested otherwise"
            );
            return;
        }
        std::thread::spawn(move || {
            {
                let boost = cp.enter("a").expect("budget and CAP_SYS_NICE: raised");
                assert_eq!(
                    this_thread_policy(),
                    libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK
                );
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                drop(boost);
            }
            assert_eq!(this_thread_policy(), libc::SCHED_OTHER);
            let left = cp.lock().tenants["a"].tokens;
            assert!(
                left <= 100_000 - 4_000,
                "5 ms of spinning charged: {left} us left"
            );
        })
        .join()
        .unwrap();
    }
}
