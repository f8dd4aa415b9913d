//! tap-ctl ⇄ broker messages.
//!
//! The broker identifies the peer by `SO_PEERCRED` only: nothing in these
//! messages says who is asking. Every request is answered by exactly one
//! [`Reply`]. The first exchange on a connection is `Hello`, and a version
//! mismatch ends the connection with an error reply.

use crate::state::State;
use crate::stats::WorkerStats;
use crate::Minor;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Bumped on every incompatible change of [`Request`] or [`Reply`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Where tap-ctl finds the broker when neither `--socket` nor
/// `TAPJAIL_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tapjail/broker.sock";

/// tap-ctl's image TYPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageKind {
    /// VHD: fixed, dynamic or differencing.
    Vhd,
    /// Raw file (blktap's `aio`).
    Aio,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Vhd => "vhd",
            ImageKind::Aio => "aio",
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `TYPE:PATH` as given to `tap-ctl open -a`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub kind: ImageKind,
    pub path: String,
}

impl std::str::FromStr for ImageSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, path) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not TYPE:PATH (for example vhd:/srv/disk.vhd)"))?;
        let kind = match kind {
            "vhd" => ImageKind::Vhd,
            "aio" | "raw" => ImageKind::Aio,
            other => return Err(format!("unknown image type {other:?}: use vhd or aio")),
        };
        if path.is_empty() {
            return Err("empty image path".into());
        }
        Ok(ImageSpec {
            kind,
            path: path.to_string(),
        })
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.path)
    }
}

/// Which kernel path serves a minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    Ublk,
    Fuse,
    Nbd,
    /// The kernel's own nbd client on `/dev/nbdN`, connected by the broker
    /// to the worker over socketpairs (no negotiation phase).
    NbdKernel,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::Ublk => "ublk",
            FrontendKind::Fuse => "fuse",
            FrontendKind::Nbd => "nbd",
            FrontendKind::NbdKernel => "nbd-kernel",
        }
    }
}

/// A request from tap-ctl. `pid` fields are the tapdisk pid given with
/// `-p`; where blktap makes it optional we do too, and when given it must
/// match the worker attached to the minor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello {
        version: u32,
    },
    Allocate {
        minor: Option<Minor>,
    },
    Free {
        minor: Minor,
    },
    Spawn,
    Attach {
        pid: u32,
        minor: Minor,
    },
    Detach {
        pid: Option<u32>,
        minor: Minor,
    },
    Open {
        pid: Option<u32>,
        minor: Minor,
        image: ImageSpec,
        read_only: bool,
    },
    Close {
        pid: Option<u32>,
        minor: Minor,
        force: bool,
    },
    Create {
        image: ImageSpec,
        read_only: bool,
        minor: Option<Minor>,
    },
    Destroy {
        pid: Option<u32>,
        minor: Minor,
    },
    Pause {
        pid: Option<u32>,
        minor: Minor,
    },
    Unpause {
        pid: Option<u32>,
        minor: Minor,
        image: Option<ImageSpec>,
    },
    List {
        pid: Option<u32>,
        minor: Option<Minor>,
    },
    Stats {
        pid: Option<u32>,
        minor: Minor,
    },
    /// Admin only: change I/O limits at runtime. Each change sets one knob
    /// (`None`: no limit); knobs not named keep their value.
    Throttle {
        target: crate::qos::ThrottleTarget,
        changes: Vec<(crate::qos::Knob, Option<crate::qos::Rate>)>,
    },
    /// `req` with the flags XAPI's storage manager adds (see [`crate::xapi`]).
    /// Sent only when at least one of them is given.
    WithOptions {
        req: Box<Request>,
        opts: crate::xapi::Options,
    },
    /// `tap-ctl major`: the block major of the devices this broker creates.
    Major,
    /// `tap-ctl snapshot -m N -n CHILD`: a new differencing child of the
    /// open leaf, created beneath the tenant's roots, becomes the leaf
    /// while the disk serves (see `tapjail_common::snapshot`).
    Snapshot {
        pid: Option<u32>,
        minor: Minor,
        child: String,
    },
    /// `tap-ctl cbt`: changed-block tracking (see [`crate::cbt`]).
    Cbt(crate::cbt::CbtRequest),
    /// `tap-ctl coalesce -m N --stream|--commit`: merge the leaf and its
    /// parent while the disk serves (see `tapjail_common::coalesce`).
    Coalesce {
        pid: Option<u32>,
        minor: Minor,
        direction: crate::coalesce::Direction,
        /// Copy rate bound in bytes per second (0: the default).
        rate: u64,
    },
}

impl Request {
    /// Short verb for logs and audit lines.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Allocate { .. } => "allocate",
            Request::Free { .. } => "free",
            Request::Spawn => "spawn",
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
            Request::Open { .. } => "open",
            Request::Close { .. } => "close",
            Request::Create { .. } => "create",
            Request::Destroy { .. } => "destroy",
            Request::Pause { .. } => "pause",
            Request::Unpause { .. } => "unpause",
            Request::List { .. } => "list",
            Request::Stats { .. } => "stats",
            Request::Throttle { .. } => "throttle",
            Request::WithOptions { req, .. } => req.verb(),
            Request::Major => "major",
            Request::Snapshot { .. } => "snapshot",
            Request::Cbt(_) => "cbt",
            Request::Coalesce { .. } => "coalesce",
        }
    }
}

/// One row of `tap-ctl list`. A row may be a bare minor (no worker), a bare
/// worker (not attached) or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub pid: Option<u32>,
    pub minor: Option<Minor>,
    pub state: Option<State>,
    pub image: Option<ImageSpec>,
    pub read_only: bool,
    pub frontend: Option<FrontendKind>,
    /// `/dev/tapjail/tapdevN` once a kernel device exists.
    pub device: Option<String>,
    /// How many times the broker replaced a dead worker for this minor.
    pub restarts: u32,
    /// The minor's `-2` mirror, as the broker recorded it.
    #[serde(default)]
    pub mirror: Option<crate::mirror::MirrorRecord>,
}

/// Why a request failed, for scripts; the message is for humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Policy refused it.
    Denied,
    /// Unknown minor or pid.
    NotFound,
    /// Not allowed in the current state (open twice, free while attached...).
    Busy,
    /// Malformed arguments.
    Invalid,
    /// Protocol version mismatch.
    Version,
    /// The kernel or the worker failed.
    Failed,
    /// A blktap feature tapjail does not build (`-r`, `-2`, `-C`, `-E`...).
    Unsupported,
    /// The tapdisk did not answer within the request's `-t SECS`.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: u32,
    },
    Ok,
    Allocated {
        minor: Minor,
        device: String,
    },
    Spawned {
        pid: u32,
    },
    Created {
        minor: Minor,
        pid: u32,
        device: String,
    },
    List(Vec<ListEntry>),
    Stats(Box<StatsReply>),
    /// `throttle`: the limits now in force on the target (for a minor,
    /// its own; for a tenant, the shared ones).
    Throttled(crate::qos::IoLimits),
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// Answer to [`Request::Major`].
    Major {
        major: u32,
    },
    /// Answer to [`Request::Snapshot`].
    Snapshotted(crate::snapshot::SnapshotDone),
    /// Answer to [`Request::Cbt`]: the minor's bitmaps after the change.
    Cbt(Vec<crate::cbt::CbtInfo>),
    /// Answer to [`Request::Coalesce`].
    Coalesced(crate::coalesce::CoalesceDone),
}

/// `tap-ctl stats`: the worker's figures plus what only the broker knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    pub minor: Minor,
    pub pid: u32,
    pub frontend: Option<FrontendKind>,
    pub restarts: u32,
    pub worker: WorkerStats,
    /// The tenant owning the minor, for metrics labels.
    pub tenant: String,
    /// The worker's cgroup, when workers run in cgroups.
    pub cgroup: Option<crate::stats::CgroupStats>,
    /// I/O limits and how long requests waited for them.
    pub throttle: Option<crate::qos::ThrottleStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_spec_parses_type_and_path() {
        let s: ImageSpec = "vhd:/srv/a.vhd".parse().unwrap();
        assert_eq!(s.kind, ImageKind::Vhd);
        assert_eq!(s.path, "/srv/a.vhd");
        assert_eq!(s.to_string(), "vhd:/srv/a.vhd");
        assert_eq!("aio:/x:y".parse::<ImageSpec>().unwrap().path, "/x:y");
        assert!("qcow2:/x".parse::<ImageSpec>().is_err());
        assert!("/x".parse::<ImageSpec>().is_err());
        assert!("vhd:".parse::<ImageSpec>().is_err());
    }
}
