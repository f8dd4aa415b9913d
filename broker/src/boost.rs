//! A higher CPU weight for the control plane while a tenant's request
//! acts, within a CPU budget per tenant.
//!
//! Why: a `create` needs about 6 ms of CPU (2 in its request thread, 4 in
//! the new worker: exec, confinement, the image's headers, FUSE, the loop
//! device's first reads), spread over dozens of wake-ups. With the
//! tenants' I/O keeping both CPUs of the bench host busy, each of those
//! steps got its fair share and no more, and create's median went from 11
//! to 35-60 ms. At nice -10 (9.3 times the weight of nice 0) the same
//! steps run well ahead of the tenants' I/O threads: in same-run
//! alternating samples at 1000 disks, 30.6 / 32.2 ms boosted against 46.8
//! / 59.4 ms not, with idle creates unchanged.
//!
//! Why nice and not real time: a weight cannot starve anything. A boosted
//! thread that spun would take nine tenths of a CPU from one competitor,
//! never all of it, so it is safe for the new worker to stay boosted
//! through the steps that read the tenant's image and serve the loop
//! device's first reads; those are most of its start. (An earlier round
//! tried `SCHED_FIFO`, which must end before a worker reads any image
//! byte, and gained nothing.) A shorter EEVDF slice, which changes
//! latency but not weight, did not help either: the steps are CPU, not
//! wake-up latency.
//!
//! Bounds:
//! - Only requests that change state and have a tenant (not `list`,
//!   `stats`, nor anything refused), and only while the request runs: the
//!   request thread goes back to nice 0 when it returns, and so does every
//!   worker it started (the whole process group, checked thread by
//!   thread; a worker that cannot be lowered is killed).
//! - The request thread is raised with `SCHED_RESET_ON_FORK`: a thread or
//!   process it starts begins at nice 0, except the worker, which the
//!   broker starts boosted on purpose.
//! - Each tenant may use `control_boost_ms` of CPU a second boosted (its
//!   request threads' and its new workers' CPU), all tenants together two
//!   and a half times that; past it, requests run at the normal weight
//!   until the budget refills. A request overdraws by at most its own CPU.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The nice value of a boosted thread: 9548 against nice 0's 1024 in the
/// kernel's weight table.
pub const BOOST_NICE: i32 = -10;

/// All tenants together may use this many tenths of one tenant's budget.
const TOTAL_FACTOR_TENTHS: u64 = 25;

/// Lowering a worker's process group is checked this many times before
/// the worker is killed instead (a thread being cloned while the group is
/// lowered can be missed by one pass, never by the next).
const LOWER_PASSES: usize = 5;

/// The per-tenant and total budgets, in CPU microseconds that refill at
/// their capacity per second.
#[derive(Debug)]
pub struct ControlBoost {
    per_tenant_us: u64,
    total_us: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tenants: HashMap<String, Bucket>,
    total: Bucket,
    /// The kernel refused a raise once (no CAP_SYS_NICE): said once,
    /// then not tried again.
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
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let add = elapsed_us.saturating_mul(capacity) / 1_000_000;
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
    /// The workers (process group leaders) started by this thread's
    /// boosted request, `None` when the thread is not boosted.
    static BOOSTED: RefCell<Option<Vec<u32>>> = const { RefCell::new(None) };
}

/// Whether the calling thread runs a boosted request now: a worker it
/// spawns then starts at [`BOOST_NICE`] too.
pub fn this_thread_boosted() -> bool {
    BOOSTED.with(|b| b.borrow().is_some())
}

/// A worker `pid` (the leader of its own process group) was started
/// boosted by this thread's request: lowered again when the request ends.
pub fn started_boosted(pid: u32) {
    BOOSTED.with(|b| {
        if let Some(pids) = b.borrow_mut().as_mut() {
            pids.push(pid);
        }
    });
}

/// A request running boosted; dropped, its thread and the workers it
/// started go back to nice 0 and the CPU they used is charged.
#[derive(Debug)]
pub struct Boost<'a> {
    owner: &'a ControlBoost,
    tenant: String,
    cpu_at_start: Duration,
}

impl ControlBoost {
    /// Budgets of `per_tenant_ms` CPU milliseconds a second (0: never
    /// boost).
    pub fn new(per_tenant_ms: u32) -> Self {
        let per_tenant_us = u64::from(per_tenant_ms) * 1000;
        let total_us = per_tenant_us * TOTAL_FACTOR_TENTHS / 10;
        ControlBoost {
            per_tenant_us,
            total_us,
            state: Mutex::new(State {
                tenants: HashMap::new(),
                total: Bucket::full(total_us, Instant::now()),
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

    /// Boost the calling thread for one of `tenant`'s requests, if the
    /// budgets allow; `None` runs it at the normal weight.
    pub fn enter(&self, tenant: &str) -> Option<Boost<'_>> {
        if !self.grant(tenant, Instant::now()) {
            return None;
        }
        if let Err(e) = set_this_thread(BOOST_NICE, true) {
            let mut s = self.lock();
            if !s.refused {
                s.refused = true;
                tracing::warn!(
                    "control_boost: cannot raise request threads ({e}); requests run at \
                     the normal weight (set control_boost_ms = 0 to say so)"
                );
            }
            return None;
        }
        BOOSTED.with(|b| *b.borrow_mut() = Some(Vec::new()));
        Some(Boost {
            owner: self,
            tenant: tenant.to_string(),
            cpu_at_start: thread_cpu_time(),
        })
    }
}

impl Drop for Boost<'_> {
    fn drop(&mut self) {
        let workers = BOOSTED.with(|b| b.borrow_mut().take()).unwrap_or_default();
        let mut used = Duration::ZERO;
        for pid in workers {
            match lower_group(pid) {
                Ok(cpu) => used += cpu,
                Err(raised) => {
                    // It would serve a tenant's I/O ahead of every other
                    // tenant's: it goes, and its disk's worker is
                    // respawned at the normal weight like any dead one.
                    tracing::error!(
                        "control_boost: worker {pid} still has boosted threads {raised:?} \
                         after {LOWER_PASSES} passes; killing it"
                    );
                    // SAFETY: kill takes integers; `pid` is a worker of
                    // ours that `lower_group` just found alive and boosted.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
        if let Err(e) = set_this_thread(0, false) {
            // The thread stays raised: end the broker rather than serve on
            // boosted (its clients see their connections close).
            tracing::error!("control_boost: cannot lower a request thread again ({e})");
            std::process::abort();
        }
        used += thread_cpu_time().saturating_sub(self.cpu_at_start);
        self.owner.charge(&self.tenant, used);
    }
}

/// Set the calling thread's nice value (with `SCHED_RESET_ON_FORK` if
/// `reset_on_fork`: what it starts begins at nice 0).
fn set_this_thread(nice: i32, reset_on_fork: bool) -> std::io::Result<()> {
    /// `struct sched_attr` up to `sched_period` (SCHED_ATTR_SIZE_VER0),
    /// which libc does not define.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: if reset_on_fork {
            SCHED_FLAG_RESET_ON_FORK
        } else {
            0
        },
        nice,
        priority: 0,
        runtime: 0,
        deadline: 0,
        period: 0,
    };
    // SAFETY: tid 0 is the calling thread; `attr` is a valid sched_attr of
    // the size it states, outliving the call; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Put every thread of process group `pgid` at nice 0, then check each
/// thread of its leader: `Ok` with the CPU they used so far, `Err` with
/// the threads still boosted after [`LOWER_PASSES`] passes. A leader that
/// is gone has nothing left to lower.
pub fn lower_group(pgid: u32) -> Result<Duration, Vec<u32>> {
    let mut raised = Vec::new();
    for _ in 0..LOWER_PASSES {
        // SAFETY: setpriority takes integers. PRIO_PGRP walks every thread
        // of every process in the group under the kernel's task list lock.
        unsafe { libc::setpriority(libc::PRIO_PGRP, pgid, 0) };
        let Ok(threads) = crate::sys::thread_sched(pgid) else {
            return Ok(Duration::ZERO);
        };
        raised = threads
            .iter()
            .filter(|t| t.nice < 0)
            .map(|t| t.tid)
            .collect();
        if raised.is_empty() {
            return Ok(threads.iter().map(|t| t.cpu).sum());
        }
    }
    Err(raised)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn this_thread_nice() -> i32 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let me = std::process::id();
        crate::sys::thread_sched(me)
            .unwrap()
            .into_iter()
            .find(|t| t.tid == tid)
            .expect("this thread is listed")
            .nice
    }

    fn as_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root || std::env::var("CI").is_err(),
            "CI runs as root: raising a thread cannot be tested otherwise"
        );
        root
    }

    #[test]
    fn a_tenant_past_its_budget_waits_for_the_refill_and_others_are_not_charged() {
        let cb = ControlBoost::new(10); // 10 ms a second each
        let t0 = Instant::now();
        assert!(cb.grant("a", t0));
        cb.charge("a", Duration::from_millis(12));
        assert!(!cb.grant("a", t0), "overdrawn by 2 ms");
        assert!(cb.grant("b", t0), "b has its own bucket");
        // -2 ms, plus 200 ms of refill at 10 ms/s: zero, not above.
        assert!(!cb.grant("a", t0 + Duration::from_millis(200)));
        assert!(cb.grant("a", t0 + Duration::from_millis(300)));
    }

    #[test]
    fn all_tenants_together_stop_at_two_and_a_half_budgets() {
        let cb = ControlBoost::new(10);
        let t0 = Instant::now();
        for t in ["a", "b"] {
            assert!(cb.grant(t, t0));
            cb.charge(t, Duration::from_millis(10));
        }
        assert!(cb.grant("c", t0));
        cb.charge("c", Duration::from_millis(5));
        assert!(
            !cb.grant("d", t0),
            "25 ms of 25 used: d, fresh, still waits"
        );
    }

    #[test]
    fn a_full_bucket_holds_one_second_not_more() {
        let cb = ControlBoost::new(10);
        let t0 = Instant::now();
        assert!(cb.grant("a", t0));
        // An hour idle refills to 10 ms, not 36 s.
        let later = t0 + Duration::from_secs(3600);
        assert!(cb.grant("a", later));
        cb.charge("a", Duration::from_millis(11));
        assert!(!cb.grant("a", later));
    }

    #[test]
    fn zero_never_boosts() {
        let cb = ControlBoost::new(0);
        assert!(cb.enter("a").is_none());
        assert!(!this_thread_boosted());
    }

    /// As root (CI): the thread runs at nice -10 while the boost lives, a
    /// thread it starts does not, and afterwards it is back at 0 with
    /// its CPU charged.
    #[test]
    fn a_boost_raises_only_this_thread_and_ending_it_charges_the_cpu_used() {
        if !as_root() {
            return;
        }
        let cb = ControlBoost::new(100);
        std::thread::spawn(move || {
            {
                let boost = cb.enter("a").expect("budget and CAP_SYS_NICE: boosted");
                assert_eq!(this_thread_nice(), BOOST_NICE);
                assert!(this_thread_boosted());
                let child = std::thread::spawn(this_thread_nice).join().unwrap();
                assert_eq!(
                    child, 0,
                    "SCHED_RESET_ON_FORK: a thread it starts is not boosted"
                );
                // 5 ms of this thread's CPU, however long that takes.
                let spin = thread_cpu_time();
                while thread_cpu_time() - spin < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                drop(boost);
            }
            assert_eq!(this_thread_nice(), 0);
            assert!(!this_thread_boosted());
            let left = cb.lock().tenants["a"].tokens;
            assert!(
                left <= 100_000 - 5_000,
                "5 ms of CPU charged: {left} us left"
            );
        })
        .join()
        .unwrap();
    }

    /// A boosted process group (a shell and the children it forked, all
    /// boosted from the start) is lowered as a whole, and the CPU it used
    /// is counted.
    #[test]
    fn lowering_a_group_reaches_every_process_and_thread_in_it() {
        if !as_root() {
            return;
        }
        use std::io::{BufRead, BufReader};
        use std::os::fd::AsRawFd;
        let (r, w) = std::io::pipe().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        // Two children in the shell's group, each saying when it runs.
        let child = tapjail_broker::spawn::spawn(
            std::path::Path::new("/bin/sh"),
            &[
                std::ffi::OsStr::new("-c"),
                std::ffi::OsStr::new("sleep 30 & sleep 30 & echo started; wait"),
            ],
            &[],
            tapjail_broker::spawn::Setup {
                new_process_group: true,
                stdio: Some([null.as_raw_fd(), w.as_raw_fd(), null.as_raw_fd()]),
                nice: Some(BOOST_NICE),
                ..Default::default()
            },
        )
        .unwrap();
        drop(w);
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).unwrap();
        assert_eq!(line, "started\n");
        let group: Vec<i32> = group_members(child.pid)
            .iter()
            .map(|&p| nice_of(p))
            .collect();
        assert_eq!(group.len(), 3, "the shell and its two sleeps");
        assert!(group.iter().all(|&n| n == BOOST_NICE), "boosted: {group:?}");
        let cpu = lower_group(child.pid).expect("lowered");
        assert!(cpu > Duration::ZERO, "the shell ran: its CPU is counted");
        let group: Vec<i32> = group_members(child.pid)
            .iter()
            .map(|&p| nice_of(p))
            .collect();
        assert_eq!(group, [0, 0, 0], "every process of the group at nice 0");
        // SAFETY: kill takes integers; the group is ours.
        unsafe { libc::kill(-(child.pid as i32), libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: our child, reaped once.
        unsafe { libc::waitpid(child.pid as i32, &mut status, 0) };
    }

    /// Processes whose process group is `pgid` (field 5 of their stat).
    fn group_members(pgid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            if rest[2] == pgid.to_string() {
                out.push(pid);
            }
        }
        out
    }

    fn nice_of(pid: u32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        rest[16].parse().unwrap()
    }
}
