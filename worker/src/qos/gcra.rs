//! The token bucket, as one number: GCRA (the generic cell rate algorithm
//! of ATM networks, the "virtual scheduling" form).
//!
//! A bucket of `burst` tokens filling at `rate` per second is kept as `e`,
//! the time at which it would be empty: it holds `min(burst, (now - e) *
//! rate)` tokens. Taking `cost` tokens moves `e` to `max(e, now - burst /
//! rate) + cost / rate`, and the request may go at the new `e`. Because the
//! whole state is one `u64` it lives in an atomic, updated by
//! compare-and-swap without a lock, which is what lets several processes
//! share one bucket through shared memory (see [`super::shared`]).
//!
//! Every request reserves its slot when it arrives and may go into debt:
//! requests are let go in arrival order (no overtaking, so no starvation,
//! and a request larger than the burst waits its share instead of waiting
//! for a full bucket that small requests keep draining).
//!
//! Time is passed in (nanoseconds of CLOCK_MONOTONIC in the worker), so the
//! tests drive it by hand.

use std::sync::atomic::{AtomicU64, Ordering};

const NS: u128 = 1_000_000_000;

/// Added to every time kept in a cell, so that "a full bucket" (`now -
/// burst / rate`) never saturates at 0 right after boot: a fresh cell (0)
/// reads as full. Larger than the longest burst (`MAX_BURST_SECS`).
const BIAS: u64 = 1 << 42;

fn biased(now: u64) -> u64 {
    now.saturating_add(BIAS)
}

/// A bucket's shape: `rate` units per second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rate: u64,
    pub burst: u64,
}

impl Shape {
    /// Nanoseconds that `units` are worth at this rate (saturating).
    fn ns(&self, units: u64) -> u64 {
        let r = u128::from(self.rate.max(1));
        u64::try_from(u128::from(units) * NS / r).unwrap_or(u64::MAX)
    }
}

/// The empty-time after taking `cost` from a bucket whose empty-time is `e`.
fn next(e: u64, now: u64, cost: u64, shape: Shape) -> u64 {
    let full = biased(now).saturating_sub(shape.ns(shape.burst));
    e.max(full).saturating_add(shape.ns(cost))
}

/// Take `cost` tokens at `now`: returns how long (ns) the request must
/// wait before it goes (0: at once). Always succeeds; the wait is the
/// request's place in the queue.
pub fn reserve(cell: &AtomicU64, now: u64, cost: u64, shape: Shape) -> u64 {
    let mut e = cell.load(Ordering::Relaxed);
    loop {
        let n = next(e, now, cost, shape);
        match cell.compare_exchange_weak(e, n, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return n.saturating_sub(biased(now)),
            Err(cur) => e = cur,
        }
    }
}

/// How long a request of `cost` would wait at `now`, taking nothing.
pub fn peek(cell: &AtomicU64, now: u64, cost: u64, shape: Shape) -> u64 {
    next(cell.load(Ordering::Relaxed), now, cost, shape).saturating_sub(biased(now))
}

/// Forget debt left by an older shape (a slower rate may have pushed `e`
/// far ahead): the bucket is empty now, not minutes from now. A full
/// bucket stays full.
pub fn forgive(cell: &AtomicU64, now: u64) {
    cell.fetch_min(biased(now), Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_000 * NS as u64;

    fn shape(rate: u64, burst: u64) -> Shape {
        Shape { rate, burst }
    }

    #[test]
    fn a_full_bucket_lets_the_burst_through_then_paces_at_the_rate() {
        let c = AtomicU64::new(0);
        let s = shape(100, 10); // 100/s: one per 10 ms
        for i in 0..10 {
            assert_eq!(reserve(&c, T0, 1, s), 0, "burst request {i}");
        }
        for i in 1..=50u64 {
            assert_eq!(
                reserve(&c, T0, 1, s),
                i * 10 * MS,
                "request {i} past the burst"
            );
        }
    }

    #[test]
    fn sustained_arrivals_at_the_rate_never_wait_and_faster_ones_do() {
        let c = AtomicU64::new(0);
        let s = shape(100, 1);
        for i in 0..1000 {
            assert_eq!(reserve(&c, T0 + i * 10 * MS, 1, s), 0, "at the rate");
        }
        // Twice the rate: each second request falls further behind.
        let c = AtomicU64::new(0);
        let start = T0;
        let mut waited = 0;
        for i in 0..100 {
            waited = reserve(&c, start + i * 5 * MS, 1, s);
        }
        // 100 requests take 99 intervals of 10 ms; the last came at 495 ms.
        assert_eq!(waited, 990 * MS - 495 * MS);
    }

    #[test]
    fn over_any_window_at_most_burst_plus_rate_times_window_pass() {
        // Random arrivals and costs; releases must respect the envelope.
        let s = shape(1000, 64);
        let c = AtomicU64::new(0);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut now = T0;
        let mut releases = Vec::new();
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            now += seed % (2 * MS);
            let cost = 1 + seed % 8;
            let wait = reserve(&c, now, cost, s);
            releases.push((now + wait, cost));
        }
        releases.sort();
        for (i, &(t0, _)) in releases.iter().enumerate().step_by(37) {
            let mut sum = 0u128;
            for &(t, cost) in &releases[i..] {
                let window = u128::from(t - t0);
                sum += u128::from(cost);
                assert!(
                    sum <= u128::from(s.burst) + 8 + window * u128::from(s.rate) / NS,
                    "{sum} units within {window} ns"
                );
            }
        }
    }

    #[test]
    fn requests_go_in_arrival_order_and_a_big_one_is_not_starved() {
        let c = AtomicU64::new(0);
        let s = shape(1_000_000, 64 * 1024); // 1 MB/s, 64 KiB burst
                                             // A 1 MiB request after the burst is spent waits its share...
        assert_eq!(reserve(&c, T0, 64 * 1024, s), 0);
        let big = reserve(&c, T0, 1 << 20, s);
        assert_eq!(big, s.ns(1 << 20));
        // ...and small requests arriving after it queue behind it instead
        // of draining the bucket under it.
        let mut last = big;
        for _ in 0..100 {
            let w = reserve(&c, T0, 4096, s);
            assert!(w > last, "a later request overtook an earlier one");
            last = w;
        }
    }

    #[test]
    fn fairness_two_takers_of_one_bucket_alternate() {
        // Two disks sharing a tenant bucket, both always busy: each gets
        // half, whichever asks first.
        let c = AtomicU64::new(0);
        let s = shape(100, 1);
        let mut now = T0;
        let mut got = [0u64; 2];
        for i in 0..1000 {
            let w = reserve(&c, now, 1, s);
            now += w; // each waits its turn, then the other asks
            got[i % 2] += 1;
        }
        assert_eq!(got[0], got[1]);
        assert!(now - T0 >= 998 * 10 * MS);
    }

    #[test]
    fn peek_takes_nothing_and_forgive_drops_old_debt() {
        let c = AtomicU64::new(0);
        let slow = shape(1, 1);
        assert_eq!(reserve(&c, T0, 1, slow), 0);
        assert_eq!(peek(&c, T0, 1, slow), NS as u64);
        assert_eq!(peek(&c, T0, 1, slow), NS as u64, "peek reserved");
        for _ in 0..60 {
            reserve(&c, T0, 1, slow);
        }
        // The admin raises the limit: the minute of debt is forgiven.
        forgive(&c, T0);
        let fast = shape(1000, 1);
        assert_eq!(reserve(&c, T0, 1, fast), NS as u64 / 1000);
        // A bucket that was full stays full.
        let full = AtomicU64::new(0);
        forgive(&full, T0);
        assert_eq!(reserve(&full, T0, 1, fast), 0);
    }

    #[test]
    fn extreme_values_saturate_instead_of_wrapping() {
        let c = AtomicU64::new(0);
        let s = shape(1, 60);
        assert_eq!(reserve(&c, 5, 1, s), 0, "clock near zero");
        let w = reserve(&c, T0, u64::MAX, s);
        assert!(w > u64::MAX / 2);
        assert_eq!(reserve(&c, T0, u64::MAX, s), w, "saturated, not wrapped");
    }
}
