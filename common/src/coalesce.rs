//! Online coalesce (qemu's block-stream and block-commit while the disk
//! serves): the types tap-ctl, the broker and the worker share.
//!
//! The worker, which alone parses image bytes, copies in the background
//! and switches its chain; the broker decides, opens the file that is
//! written and records the new chain before any guest write lands in it
//! (see the broker's `ops::coalesce`).

use serde::{Deserialize, Serialize};

/// Which way the merge goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The parent's blocks are copied into the leaf, which then stands
    /// alone (qemu's block-stream): the parent is no longer used.
    Stream,
    /// The leaf's blocks are copied into its parent, which then becomes
    /// the leaf (qemu's block-commit of the active layer).
    Commit,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Stream => "stream",
            Direction::Commit => "commit",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a merge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoalesceState {
    /// Copying in the background; the guest's I/O carries on.
    Copying,
    /// Every block is copied; waiting for the switch.
    Copied,
    /// I/O is held for the switch.
    Held,
    /// Switched: the new chain serves.
    Done,
    /// The copy failed; the disk serves the old chain, unchanged.
    Failed,
}

impl CoalesceState {
    pub fn as_str(self) -> &'static str {
        match self {
            CoalesceState::Copying => "copying",
            CoalesceState::Copied => "copied",
            CoalesceState::Held => "held",
            CoalesceState::Done => "done",
            CoalesceState::Failed => "failed",
        }
    }
}

/// A merge's progress, in `tap-ctl stats` (`coalesce`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoalesceStats {
    pub direction: Direction,
    pub state: CoalesceState,
    /// Chunks of the virtual disk looked at so far, and in all.
    pub done: u64,
    pub total: u64,
    /// Bytes copied so far.
    pub copied_bytes: u64,
    /// Why it failed, when `state` is `Failed`.
    #[serde(default)]
    pub error: Option<String>,
}

/// How fast a merge copies unless told otherwise, in bytes per second:
/// bounded so that the guest's own I/O keeps most of the disk.
pub const DEFAULT_RATE: u64 = 64 << 20;

/// Longest error text a worker's stats may carry to the broker.
pub const MAX_ERROR_LEN: usize = 512;

/// The broker's steps (see `ToWorker::Coalesce`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorkerCoalesce {
    /// Start copying in the background. fds: \[the file written, opened
    /// read-write: for `Stream` the leaf again, for `Commit` its
    /// parent\]. `name` is that file's path (for stats).
    Start {
        direction: Direction,
        name: String,
        /// Copy at most this many bytes per second (0: [`DEFAULT_RATE`]).
        rate: u64,
    },
    /// Wait (at most about 100 ms) for the copy to finish; answered
    /// with the progress.
    Wait,
    /// Hold I/O, copy what the guest wrote since, make the written file
    /// durable (and, for `Stream`, drop its parent from its header).
    /// Answered with state `Held`; I/O stays held until `Switch` or
    /// `Abort`.
    Hold,
    /// Serve the new chain and release I/O.
    Switch,
    /// Stop: release I/O on the old chain and forget the merge.
    Abort,
}

/// The worker's answer to every `ToWorkerCoalesce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoalesceReply {
    pub stats: CoalesceStats,
    /// After `Switch`: the new chain, leaf first.
    pub chain: Vec<String>,
    /// After `Switch`: how long I/O was held, in microseconds.
    pub stall_us: u64,
}

/// The answer to `tap-ctl coalesce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoalesceDone {
    pub direction: Direction,
    /// Leaf first.
    pub chain: Vec<String>,
    pub copied_bytes: u64,
    pub stall_us: u64,
    /// Times the merge was restarted after its worker died.
    pub restarts: u32,
}
