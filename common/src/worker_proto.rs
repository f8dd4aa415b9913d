//! broker ⇄ tapdisk worker messages, on the socketpair the worker inherits
//! as fd [`CONTROL_FD`].
//!
//! The broker drives; the worker answers each [`ToWorker`] with exactly one
//! [`FromWorker`], except that while opening a differencing chain the worker
//! may answer `Open`/`Unpause` with [`FromWorker::NeedParent`] any number of
//! times, each answered by [`ToWorker::Parent`], before its final reply.
//! Everything the worker says is untrusted: it parsed a hostile image.

use crate::proto::{FrontendKind, ImageKind};
use crate::stats::WorkerStats;
use serde::{Deserialize, Serialize};

/// The fd number of the control socket in a worker spawned by the broker.
pub const CONTROL_FD: i32 = 3;

/// The fd number of the mount namespace with the empty root that a worker
/// spawned by the broker with `--root-ns` joins instead of building its
/// own (see the broker's `worker_root`).
pub const ROOT_NS_FD: i32 = 4;

/// With `--root-ns`: the fd number of that empty root's directory (an
/// `O_PATH` fd), which the worker chroots into once it has joined: the
/// namespace's own root, where `setns` puts a process, is the empty root
/// only when the broker runs at the root of its namespace, not when it was
/// started in a chroot.
pub const ROOT_DIR_FD: i32 = 5;

/// Starts the `Error` a worker sends when another process on the host
/// already runs as the uid it was given: the broker then picks another.
pub const UID_TAKEN: &str = "worker uid taken:";

/// Longest image chain, leaf included (the VHD engine refuses a deeper
/// one). Also the most `NeedParent` requests one open may make: the
/// worker refuses to ask more, and the broker kills a worker that does.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Most parent locators one `NeedParent` may carry; the broker kills a
/// worker that sends more (a VHD header has 8 slots).
pub const MAX_LOCATORS: usize = 16;

/// Frontend-specific setup, with the fds that go along (see each variant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrontendSpec {
    /// fds: \[listening socket\]. The worker accepts NBD clients on it.
    Nbd { export_name: String },
    /// fds: \[/dev/fuse connection\]. The mount exists; the worker answers
    /// INIT and serves one regular file named `file_name` at the root.
    /// `resend`: this connection was served by a dead worker before, so send
    /// FUSE_NOTIFY_RESEND once INIT is not expected again.
    Fuse { file_name: String, resend: bool },
    /// fds: \[/dev/ublkcN\]. ADD_DEV and SET_PARAMS are done.
    Ublk {
        dev_id: u32,
        nr_queues: u16,
        queue_depth: u16,
        max_io_bytes: u32,
        recovering: bool,
    },
    /// fds: one connected stream socket per kernel nbd connection. The
    /// kernel skips negotiation, so the worker serves the transmission
    /// phase right away with these settings (the broker told the kernel
    /// the same size and flags). `max_io_bytes`: the largest READ/WRITE
    /// the kernel will send (the broker capped the queue at it).
    NbdKernel {
        size: u64,
        read_only: bool,
        max_io_bytes: u32,
    },
}

impl FrontendSpec {
    pub fn kind(&self) -> FrontendKind {
        match self {
            FrontendSpec::Nbd { .. } => FrontendKind::Nbd,
            FrontendSpec::Fuse { .. } => FrontendKind::Fuse,
            FrontendSpec::Ublk { .. } => FrontendKind::Ublk,
            FrontendSpec::NbdKernel { .. } => FrontendKind::NbdKernel,
        }
    }
}

/// A parent locator as the worker read it from a child image, for the broker
/// to resolve and policy-check. `relative` ones are relative to the child's
/// directory, which the broker knows and the worker does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLocator {
    /// `W2ku`, `W2ru`, `MacX`, or `name` for the header's parent name.
    pub code: String,
    pub path: String,
    pub relative: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// fds: \[leaf image file\]. `name` is the path as the broker opened it.
    Open {
        kind: ImageKind,
        name: String,
        read_only: bool,
    },
    /// Answer to [`FromWorker::NeedParent`]. fds: \[parent file\] when `Ok`;
    /// the string is the parent's path as opened, or why it was refused.
    Parent(Result<String, String>),
    /// Start serving the open image on a frontend (fds per [`FrontendSpec`]).
    Serve(FrontendSpec),
    /// Quiesce I/O, flush, close the image; the frontend stays.
    Pause,
    /// Reopen after `Pause`, like `Open` (fds: \[leaf\]); the virtual size
    /// must not change. Answered like `Open`: any `NeedParent`s, then
    /// `Opened` with the new chain (or `Error`, and the disk stays paused).
    Unpause {
        kind: ImageKind,
        name: String,
        read_only: bool,
    },
    /// Stop the frontend, flush and close the image.
    Close,
    Stats,
    /// Flush and exit.
    Shutdown,
    /// A broker that started again takes over this worker. The control
    /// stream may still hold what its predecessor never read (a reply, or
    /// a `NeedParent` it never answered): the worker abandons any exchange
    /// in progress (an open being made fails) and answers `Resynced` with
    /// the same nonce; the broker discards every byte before that answer.
    Resync {
        nonce: [u8; 16],
    },
    /// The I/O limits to enforce from now on: this disk's own and its
    /// tenant's. fds: \[tenant bucket memfd\] when `tenant` limits any
    /// knob (the worker maps the first it gets and keeps it; see
    /// `tapjail_worker::qos::shared`), else none. Answered `Throttle`.
    Limits {
        disk: crate::qos::IoLimits,
        tenant: crate::qos::IoLimits,
    },
    /// Answered `Throttle` with the limits in force and the delays so far.
    ThrottleStats,
    /// fds: \[a socket the broker connected to the secondary `uri`\].
    /// The worker negotiates NBD on it now and mirrors the image the next
    /// `Open` or `Unpause` opens (see `tapjail_common::mirror`); sent
    /// before either, answered `Ok` or `Error`.
    Mirror {
        uri: String,
        standby: bool,
    },
    /// While paused: the next `Unpause` serves from the mirror's secondary
    /// instead of the image it opens. Answered `Ok` only if the mirror is
    /// in sync, else `Error` saying how far it is.
    MirrorSwitch {
        uri: String,
    },
    /// Online snapshot, step 1. fds: \[new child file (read-write,
    /// empty), the open leaf (read-only)\]. The worker reads the leaf's
    /// chain from the read-only fd (asking `NeedParent` as for `Open`),
    /// writes the child's metadata and syncs it; I/O carries on on the
    /// old chain. Answered `Ok` (or `Error`: nothing is kept).
    SnapshotPrepare {
        child: String,
        parent: crate::snapshot::SnapshotParent,
    },
    /// Step 2: hold I/O, flush the old leaf, reread its metadata, make
    /// the prepared child the leaf, release I/O. Answered `Snapshotted`,
    /// or `Error` with the disk still on the old chain.
    SnapshotSwitch,
    /// Drop a prepared snapshot (the broker could not record it).
    /// Answered `Ok`.
    SnapshotAbort,
    /// How the next `Open` (and its later `Unpause`s) opens its files;
    /// sent before `Open`, answered `Ok`. `Close` resets it to the worker's
    /// `--cache`.
    Cache(crate::xapi::CachePlan),
    /// Changed-block tracking (fds per [`crate::cbt::ToWorkerCbt`]),
    /// answered `Cbt`.
    Cbt(crate::cbt::ToWorkerCbt),
    /// `open -E`: the key of blktap's encrypted VHDs for the next `Open`
    /// (and its later `Unpause`s); sent before `Open`, answered `Ok`.
    /// `unpause -E`: sent while paused, for the next `Unpause` only, kept
    /// if that reopen succeeds (see `tapjail_worker::keyring`). Refused
    /// while an image is served. `Close` forgets it (zeroized).
    Key(crate::secret::Secret),
    /// Online coalesce (see [`crate::coalesce`]), answered `Coalesce`.
    Coalesce(crate::coalesce::ToWorkerCoalesce),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The first message after exec, once confined.
    Ready {
        pid: u32,
    },
    /// The image being opened is differencing; its parent is wanted.
    NeedParent {
        child: String,
        locators: Vec<ParentLocator>,
        parent_uuid: [u8; 16],
    },
    /// The chain is open. `chain` is leaf first.
    Opened {
        virtual_size: u64,
        chain: Vec<String>,
    },
    /// The frontend is up (for FUSE: INIT answered).
    Serving,
    Ok,
    Stats(Box<WorkerStats>),
    Error(String),
    /// Answer to [`ToWorker::Resync`], with what the worker has: the
    /// `TYPE:PATH` of its open image, whether a frontend serves it and
    /// whether it is paused. The broker checks this against its record.
    Resynced {
        nonce: [u8; 16],
        image: Option<String>,
        serving: bool,
        paused: bool,
    },
    /// Answer to `Limits` and `ThrottleStats`.
    Throttle(Box<crate::qos::ThrottleStats>),
    /// Answer to `SnapshotSwitch`: the new chain, leaf first, and how
    /// long requests were held, in microseconds.
    Snapshotted {
        chain: Vec<String>,
        stall_us: u64,
    },
    /// Answer to `Cbt`: every bitmap the disk tracks now.
    Cbt(Vec<crate::cbt::CbtInfo>),
    /// Answer to `Coalesce`.
    Coalesce(Box<crate::coalesce::CoalesceReply>),
}
