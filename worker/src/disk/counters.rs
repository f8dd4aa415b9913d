//! What the disk counts for `tap-ctl stats`: requests by kind, sectors,
//! errors, latency histograms and blktap's kicks.

use crate::latency::LatencyHistograms;
use crate::qos::Dir;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tapjail_common::stats::{FrontendStats, LatencyStats};

/// Read, write, flush, discard or other, for latency accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Discard,
    Other,
}

impl IoKind {
    /// The direction I/O limits count it in (flush, discard and `Other` are not limited).
    pub(super) fn dir(self) -> Option<Dir> {
        match self {
            IoKind::Read => Some(Dir::Read),
            IoKind::Write => Some(Dir::Write),
            IoKind::Flush | IoKind::Discard | IoKind::Other => None,
        }
    }
}

/// Counters a frontend keeps for `tap-ctl stats`.
#[derive(Debug, Default)]
pub struct FrontendCounters {
    pub(super) received: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) read_secs: AtomicU64,
    pub(super) write_secs: AtomicU64,
    pub(super) read_us_total: AtomicU64,
    pub(super) read_count: AtomicU64,
    pub(super) read_us_max: AtomicU64,
    pub(super) write_us_total: AtomicU64,
    pub(super) write_count: AtomicU64,
    pub(super) write_us_max: AtomicU64,
    pub(super) kicks_in: AtomicU64,
    pub(super) kicks_out: AtomicU64,
    pub histograms: LatencyHistograms,
}

impl FrontendCounters {
    pub fn latency(&self) -> LatencyStats {
        let avg = |t: &AtomicU64, c: &AtomicU64| {
            t.load(Relaxed).checked_div(c.load(Relaxed)).unwrap_or(0)
        };
        LatencyStats {
            read_avg_us: avg(&self.read_us_total, &self.read_count),
            write_avg_us: avg(&self.write_us_total, &self.write_count),
            read_max_us: self.read_us_max.load(Relaxed),
            write_max_us: self.write_us_max.load(Relaxed),
        }
    }

    pub fn frontend(&self, kind: &str) -> FrontendStats {
        FrontendStats {
            kind: kind.to_string(),
            reqs: [self.received.load(Relaxed), self.completed.load(Relaxed)],
            errors: self.errors.load(Relaxed),
            kicks: [self.kicks_in.load(Relaxed), self.kicks_out.load(Relaxed)],
        }
    }

    /// The kernel (or client) woke this worker with new requests:
    /// blktap's `kicks[0]`. Requests per kick is the batching achieved.
    pub fn kick_in(&self) {
        self.kicks_in.fetch_add(1, Relaxed);
    }

    /// This worker handed completions back in one call: `kicks[1]`.
    pub fn kick_out(&self) {
        self.kicks_out.fetch_add(1, Relaxed);
    }

    /// Sectors read / written through the frontend (blktap's `secs`).
    pub fn secs(&self) -> [u64; 2] {
        [self.read_secs.load(Relaxed), self.write_secs.load(Relaxed)]
    }

    pub fn outstanding(&self) -> u64 {
        self.received
            .load(Relaxed)
            .saturating_sub(self.completed.load(Relaxed))
    }
}
