//! Latency histograms kept in the request completion path: fixed
//! log-spaced buckets ([`LATENCY_BOUNDS_US`]) counted with relaxed
//! atomics, so recording a request is a short scan and two adds, with no
//! lock and no allocation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tapjail_common::stats::{Histogram, Histograms, LATENCY_BOUNDS_US, LATENCY_BUCKETS};

/// One histogram's live counters.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Count one request that took `us` microseconds.
    pub fn record(&self, us: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self) -> Histogram {
        Histogram {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// The histograms per request kind that `tap-ctl metrics` shows.
#[derive(Debug, Default)]
pub struct LatencyHistograms {
    pub read: LatencyHistogram,
    pub write: LatencyHistogram,
    pub flush: LatencyHistogram,
    pub discard: LatencyHistogram,
}

impl LatencyHistograms {
    pub fn snapshot(&self) -> Histograms {
        Histograms {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            discard: self.discard.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_the_bucket_of_their_upper_bound() {
        let h = LatencyHistogram::default();
        h.record(0);
        h.record(10); // on the bound: that bucket
        h.record(11); // next bucket
        h.record(u64::MAX / 2); // beyond the last bound: +Inf
        let s = h.snapshot();
        assert!(s.well_formed());
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_us, 21 + u64::MAX / 2);
    }
}
