//! Online snapshot: the types tap-ctl, the broker and the worker share.
//!
//! The broker creates the child file and decides; the worker, which alone
//! parses image bytes, writes the child's metadata and switches its chain.
//! The switch happens in two steps so that the broker's record can name
//! the child before any guest write lands in it (see the broker's
//! `ops::snapshot`).

use serde::{Deserialize, Serialize};

/// Longest stall figure kept, in microseconds (about 71 minutes); a
/// worker reporting more is clamped, not trusted.
pub const MAX_STALL_US: u64 = u32::MAX as u64;

/// What the broker tells the worker about the parent-to-be (the open
/// leaf): the locators to write into the child. Paths are the broker's
/// (it opened the leaf); the UUID is the worker's to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotParent {
    /// The leaf's file name, for the child's parent unicode name.
    pub name: String,
    /// The leaf's path relative to the child's directory (`W2ru`).
    pub relative: String,
    /// The leaf's absolute path (`W2ku` and `MacX`).
    pub absolute: String,
}

/// The answer to a snapshot: the new chain and how long I/O was held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDone {
    /// The child, now the leaf.
    pub child: String,
    /// Leaf first.
    pub chain: Vec<String>,
    /// Time from the first request held to the release of all of them:
    /// drain, one flush of the old leaf, the old leaf's metadata reread,
    /// the switch.
    pub stall_us: u64,
}

/// Snapshot figures in `tap-ctl stats` (the worker's own, since it
/// started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// Snapshots switched to.
    pub count: u64,
    /// Stall of the last one, in microseconds.
    pub last_stall_us: u64,
    /// Longest stall so far, in microseconds.
    pub max_stall_us: u64,
}
