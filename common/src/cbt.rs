//! Changed-block tracking on the wire: `tap-ctl cbt` to the broker, and
//! the broker to the worker that keeps the bitmaps.
//!
//! Every bitmap is a file in blktap's CBT log format (64 KiB blocks) in
//! the tenant's image root: the named ones of `tap-ctl cbt` next to the
//! leaf image (`LEAF.NAME.cbt`), XAPI's where `open -C` / `unpause -c`
//! says. The broker opens them; only the worker reads them.

use crate::Minor;
use serde::{Deserialize, Serialize};

/// The name XAPI's log (`open -C`, `unpause -c`) is listed under, and
/// exported over NBD as `qemu:dirty-bitmap:xapi-cbt-log`.
pub const XAPI_LOG_NAME: &str = "xapi-cbt-log";

/// Bytes per bit: blktap's `CBT_BLOCK_SIZE`.
pub const GRANULARITY: u64 = 64 * 1024;

/// Longest bitmap name (it goes into a file name and audit lines).
pub const MAX_NAME: usize = 64;

/// Whether `name` may name a bitmap: 1..=64 of `[A-Za-z0-9_.-]`, not
/// starting with a dot (so `LEAF.NAME.cbt` stays in the leaf's directory).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The file a named bitmap of the image at `leaf` lives in.
pub fn named_path(leaf: &str, name: &str) -> String {
    format!("{leaf}.{name}.cbt")
}

/// `tap-ctl cbt ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CbtOp {
    /// Start a new, empty bitmap (its file is created or reset).
    Start,
    /// Clear the bitmap: from now on it holds what is written after this.
    Checkpoint,
    /// Stop tracking (the file is left as it is, for a last backup).
    Stop,
    List,
}

impl CbtOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CbtOp::Start => "start",
            CbtOp::Checkpoint => "checkpoint",
            CbtOp::Stop => "stop",
            CbtOp::List => "list",
        }
    }
}

/// `tap-ctl cbt OP -m MINOR [--name NAME]` (NAME is required but for
/// `list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtRequest {
    pub minor: Minor,
    pub op: CbtOp,
    pub name: Option<String>,
}

/// One tracked bitmap, for `tap-ctl cbt list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtInfo {
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Blocks marked since the last checkpoint.
    pub dirty: u64,
    /// Blocks of the disk.
    pub blocks: u64,
    /// XAPI's `-C` log (its consistent flag is left to SM).
    pub xapi_log: bool,
}

/// Broker → worker. fds: \[the log file, read-write\] with `Start` and
/// `Attach`, none otherwise. Answered `FromWorker::Cbt` with every bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorkerCbt {
    /// Reset the file to an empty bitmap for this disk and track into it.
    Start {
        name: String,
    },
    /// Track into an existing log, keeping what it marks (a respawn, a
    /// restarted broker, `open -C`). `xapi`: it is XAPI's log, which
    /// replaces any XAPI log tracked now.
    Attach {
        name: String,
        xapi: bool,
    },
    Checkpoint {
        name: String,
    },
    Stop {
        name: String,
    },
    List,
}
