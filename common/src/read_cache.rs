//! `open -r`, blktap's IntelliCache: the image opened is a local read
//! cache of its parent chain (SM's `PARENT.vhdcache`, a differencing VHD
//! whose parent is the shared image it caches, made by `vhd-util
//! snapshot`). Reads of sectors the cache lacks go to the parent and are
//! then written into the cache; the guest never writes it (the device is
//! read-only). The worker ties the cache to its parent's identity (UUID and
//! modification time, as the VHD header records them) and empties it when
//! the parent changed.

use serde::{Deserialize, Serialize};

/// What the read cache did, in `tap-ctl stats` (`read_cache`). Counts are
/// in 512-byte sectors, like blktap's `hits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadCacheStats {
    /// Sectors served from the cache file.
    pub hits: u64,
    /// Sectors the cache lacked, read from the parent chain.
    pub misses: u64,
    /// Sectors written into the cache after a miss (durable before they
    /// are marked present).
    pub filled: u64,
    /// Fills that failed (the read itself was served from the parent).
    /// After the first, the cache stops filling.
    pub fill_errors: u64,
    /// Why the cache was emptied at open (its parent changed), if it was.
    #[serde(default)]
    pub reset: Option<String>,
    /// The first failed fill, if any.
    #[serde(default)]
    pub fill_error: Option<String>,
}
