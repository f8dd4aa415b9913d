//! The I/O threads every connection's requests run on, and the budget of
//! payload bytes in flight.
//!
//! A fixed pool (not a thread per request) because every thread is locked
//! memory and counts against the worker's thread budget; requests of all
//! connections share it, so several requests of one connection and requests
//! of several connections run at the same time, each on its own io_uring.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Threads waiting for a job (so that submitting wakes one only when
    /// somebody sleeps: every notify is a syscall).
    idle: usize,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// Threads running [`Job`]s in submission order.
pub struct WorkPool {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkPool")
            .field("threads", &lock(&self.threads).len())
            .finish()
    }
}

impl WorkPool {
    pub fn start(threads: usize, stack: usize, name: &str) -> std::io::Result<WorkPool> {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        });
        let pool = WorkPool {
            inner,
            threads: Mutex::new(Vec::with_capacity(threads)),
        };
        for i in 0..threads {
            let inner = pool.inner.clone();
            let t = crate::frontend::spawn_thread_sized(&format!("{name}-{i}"), stack, move || {
                run(&inner)
            });
            match t {
                Ok(t) => lock(&pool.threads).push(t),
                Err(e) if i > 0 => {
                    // Fewer threads is slower, not wrong.
                    tracing::warn!("{name}: started {i} of {threads} I/O threads: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(pool)
    }

    /// Queue a job; it runs on the next free thread.
    pub fn submit(&self, job: Job) {
        let mut q = lock(&self.inner.queue);
        if q.closed {
            return; // dropping the job drops its guards: slots are released
        }
        q.jobs.push_back(job);
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.inner.ready.notify_one();
        }
    }

    /// Run what is queued, then stop and join every thread. Must not be
    /// called from a pool thread.
    pub fn shutdown(&self) {
        self.close();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    fn close(&self) {
        lock(&self.inner.queue).closed = true;
        self.inner.ready.notify_all();
    }
}

impl Drop for WorkPool {
    /// Threads finish the queue and exit on their own; not joined here
    /// because the last owner may be a job running on a pool thread.
    fn drop(&mut self) {
        self.close();
    }
}

fn run(inner: &Inner) {
    loop {
        let job = {
            let mut q = lock(&inner.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q.idle += 1;
                q = inner.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle -= 1;
            }
        };
        job();
    }
}

/// A counting budget (bytes of request payload in flight, or request
/// slots): `acquire` waits until the amount fits.
#[derive(Debug)]
pub struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    max: u64,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: u64,
    waiters: usize,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
            max,
        })
    }

    /// Take `n` (clamped to the maximum, so a single large request can
    /// always proceed once everything else is done); returns a guard that
    /// gives it back when dropped.
    pub fn acquire(self: &Arc<Self>, n: u64) -> BudgetGuard {
        let n = n.min(self.max);
        let mut st = lock(&self.state);
        while st.used + n > self.max {
            st.waiters += 1;
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiters -= 1;
        }
        st.used += n;
        BudgetGuard {
            budget: self.clone(),
            n,
        }
    }

    /// [`Budget::acquire`] without waiting: `None` if `n` does not fit now.
    pub fn try_acquire(self: &Arc<Self>, n: u64) -> Option<BudgetGuard> {
        let n = n.min(self.max);
        let mut st = lock(&self.state);
        if st.used + n > self.max {
            return None;
        }
        st.used += n;
        Some(BudgetGuard {
            budget: self.clone(),
            n,
        })
    }

    /// Wait until nothing is taken.
    pub fn wait_idle(&self) {
        let mut st = lock(&self.state);
        while st.used > 0 {
            st.waiters += 1;
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiters -= 1;
        }
    }

    pub fn used(&self) -> u64 {
        lock(&self.state).used
    }
}

/// Gives its share back to the [`Budget`] when dropped.
#[derive(Debug)]
pub struct BudgetGuard {
    budget: Arc<Budget>,
    n: u64,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.budget.state);
        st.used -= self.n;
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.budget.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn pool_runs_every_job_before_shutdown_returns() {
        let pool = WorkPool::start(3, 64 * 1024, "t").unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let d = done.clone();
            pool.submit(Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
            }));
        }
        pool.shutdown();
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn budget_blocks_until_a_guard_is_dropped() {
        let b = Budget::new(10);
        let g = b.acquire(8);
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let _g = b2.acquire(5);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "must wait for budget");
        drop(g);
        t.join().unwrap();
        assert_eq!(b.used(), 0);
        let _big = b.acquire(1000); // clamped, does not deadlock
    }

    #[test]
    fn budget_try_acquire_fails_instead_of_waiting() {
        let b = Budget::new(10);
        let g = b.try_acquire(8).unwrap();
        assert!(b.try_acquire(5).is_none());
        let small = b.try_acquire(2).unwrap();
        drop(g);
        assert!(b.try_acquire(5).is_some());
        drop(small);
        assert_eq!(b.used(), 0);
    }
}
