//! Stats as `tap-ctl stats` prints them: blktap's keys first, ours after.

use serde::{Deserialize, Serialize};

/// One layer of the chain (leaf first), blktap's `images[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStats {
    pub name: String,
    /// Sectors read / written on this layer.
    pub hits: [u64; 2],
    /// Failed read / write requests on this layer.
    pub fail: [u64; 2],
    pub driver: DriverStats,
}

/// blktap's `driver` object: `type` is its numeric driver id (4 = vhd, 0 = aio).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverStats {
    #[serde(rename = "type")]
    pub kind: u32,
    pub name: String,
    pub status: Option<String>,
}

/// The frontend half, our `tap` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendStats {
    /// `ublk`, `fuse` or `nbd`.
    pub kind: String,
    /// Requests received / completed.
    pub reqs: [u64; 2],
    /// Requests failed with an error returned to the kernel or client.
    pub errors: u64,
    /// blktap's `kicks` [in, out]: wakeups that brought new requests, and
    /// calls that handed completions back (ublk: io_uring_enter with
    /// commits; FUSE: one each per request; NBD: socket reads and sends).
    #[serde(default)]
    pub kicks: [u64; 2],
}

/// Latency figures in microseconds, over the worker's lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub read_avg_us: u64,
    pub write_avg_us: u64,
    pub read_max_us: u64,
    pub write_max_us: u64,
}

/// What a worker reports for `tap-ctl stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// `TYPE:PATH` of the leaf, as blktap.
    pub name: String,
    /// Sectors read / written through the frontend.
    pub secs: [u64; 2],
    /// Leaf first.
    pub images: Vec<ImageStats>,
    pub reqs_outstanding: u64,
    pub frontend: FrontendStats,
    pub latency: LatencyStats,
    /// Request latency histograms, for `tap-ctl metrics`.
    pub histograms: Histograms,
    /// The write mirror (`-2 URI`), if any.
    #[serde(default)]
    pub mirror: Option<crate::mirror::MirrorStats>,
    /// Online snapshots and their stalls.
    pub snapshot: crate::snapshot::SnapshotStats,
    /// `open -r`: the read cache's hits and misses.
    #[serde(default)]
    pub read_cache: Option<crate::read_cache::ReadCacheStats>,
    /// An online coalesce, while one runs (and its end, until the next).
    #[serde(default)]
    pub coalesce: Option<crate::coalesce::CoalesceStats>,
}

/// Upper bounds of the latency buckets, in microseconds: log-spaced
/// (1-2.5-5 per decade) from 10 µs to 10 s, Prometheus' usual spread.
/// A last, unbounded bucket (`+Inf`) follows.
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Number of buckets, the `+Inf` one included.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// One latency histogram: per-bucket counts (not cumulative; bucket `i`
/// holds requests with latency <= `LATENCY_BOUNDS_US[i]` and above the
/// previous bound) and the latency sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    /// Whether the shape matches [`LATENCY_BOUNDS_US`]; a worker's report
    /// is untrusted, and a wrong shape would render a lying histogram.
    pub fn well_formed(&self) -> bool {
        self.counts.len() == LATENCY_BUCKETS
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.saturating_add(*c))
    }
}

/// Latency histograms per request kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histograms {
    pub read: Histogram,
    pub write: Histogram,
    pub flush: Histogram,
    pub discard: Histogram,
}

impl Histograms {
    /// `(op label, histogram)` in a fixed order.
    pub fn by_op(&self) -> [(&'static str, &Histogram); 4] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("flush", &self.flush),
            ("discard", &self.discard),
        ]
    }

    /// Drops histograms of the wrong shape (see [`Histogram::well_formed`]).
    pub fn sanitize(&mut self) {
        for h in [
            &mut self.read,
            &mut self.write,
            &mut self.flush,
            &mut self.discard,
        ] {
            if !h.well_formed() {
                *h = Histogram::default();
            }
        }
    }
}

/// A worker's cgroup v2 as the broker reads it (`None` where a file is
/// missing, e.g. memory.peak before Linux 5.19).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub path: String,
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub memory_max: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    /// Processes of it the kernel's OOM killer ended (memory.events).
    pub oom_kills: Option<u64>,
}
