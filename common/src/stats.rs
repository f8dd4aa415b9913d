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
