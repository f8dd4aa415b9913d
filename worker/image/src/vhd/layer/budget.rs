//! A sparse layer's share of the worker's locked memory (see
//! [`crate::memory`]): what it needs at open, and the bitmap cache bounded
//! to what it was granted.

use super::{Sparse, BITMAPS_PER_SHARD, BITMAP_SHARDS};
use crate::memory::{Need, Reservation};
use crate::vhd::layout::{self, BatmapState};
use crate::ImageError;
use std::collections::HashMap;
use std::sync::Arc;

/// The least a shard caches: a block's read-modify-write holds its own.
const MIN_BITMAPS_PER_SHARD: usize = 2;
/// What a cached bitmap costs besides its bytes (`Arc` counts, map slot,
/// allocator rounding).
const CACHE_ENTRY_OVERHEAD: u64 = 64;
/// Requests that may each hold a bitmap copy or two at once (a frontend's
/// depth).
const IN_FLIGHT: u64 = 32;

/// Reserve what layer `name` needs; returns the reservation and how many
/// bitmaps each cache shard may hold.
pub(super) fn reserve(name: &str, s: &layout::Sparse) -> Result<(Reservation, usize), ImageError> {
    let (need, what) = need(s);
    let (memory, cache) = crate::memory::reserve(name, need, &what)?;
    let entry = u64::from(s.bitmap_bytes) + CACHE_ENTRY_OVERHEAD;
    let per_shard = usize::try_from(cache / entry / BITMAP_SHARDS as u64)
        .unwrap_or(BITMAPS_PER_SHARD)
        .clamp(MIN_BITMAPS_PER_SHARD, BITMAPS_PER_SHARD);
    Ok((memory, per_shard))
}

/// What serving a sparse layer holds in memory: the BAT as read (its
/// capacity), the full and hinted bits, the batmap a flush writes, bitmap
/// copies of requests in flight, and the bitmap cache (its floor and its
/// most); and the fixed part in words, for a refusal.
fn need(s: &layout::Sparse) -> (Need, String) {
    let bat = s.bat.capacity() as u64 * 4;
    let bits = 2 * (s.bat.len() as u64).div_ceil(64) * 8;
    let batmap = match &s.batmap {
        BatmapState::Valid { header, .. } => header.map_bytes(),
        _ => 0,
    };
    let bitmap = u64::from(s.bitmap_bytes);
    let fixed = bat + bits + batmap + IN_FLIGHT * 2 * bitmap;
    let entry = bitmap + CACHE_ENTRY_OVERHEAD;
    let per = |n: usize| (BITMAP_SHARDS * n) as u64 * entry;
    let need = Need {
        fixed,
        cache_min: per(MIN_BITMAPS_PER_SHARD),
        cache_max: per(BITMAPS_PER_SHARD),
    };
    let what = format!(
        "a {} KiB block allocation table for {} blocks of {} KiB, and {} KiB of \
         block and sector bitmaps",
        bat / 1024,
        s.bat.len(),
        s.block_size / 1024,
        (fixed - bat + need.cache_min) / 1024
    );
    (need, what)
}

/// Cache `map` as `block`'s bitmap, evicting another when the shard holds
/// what the budget allows.
pub(super) fn cache_insert(
    s: &Sparse,
    shard: &mut HashMap<u32, Arc<[u8]>>,
    block: usize,
    map: Arc<[u8]>,
) {
    if shard.len() >= s.cache_per_shard && !shard.contains_key(&(block as u32)) {
        if let Some(&k) = shard.keys().next() {
            shard.remove(&k);
        }
    }
    shard.insert(block as u32, map);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::create::{create, CreateKind};
    use crate::vhd::layout::Metadata;

    /// The largest disk in 4 MiB blocks: 2040 KiB of BAT held whatever
    /// it serves, and a cache of 4096 bitmaps of 1 KiB at most, 32 at
    /// least; the refusal names the table.
    #[test]
    fn largest_vhd_in_4mib_blocks_needs_its_table_and_a_bounded_cache() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create_new(dir.path().join("big.vhd")).unwrap();
        let size = crate::vhd::MAX_VIRTUAL_SIZE;
        create(
            &f,
            size,
            &CreateKind::Dynamic {
                block_size: 4 << 20,
            },
        )
        .unwrap();
        let meta = Metadata::read(&f).unwrap();
        let (need, what) = need(meta.sparse.as_ref().unwrap());
        assert!(need.fixed >= 2040 << 10, "{need:?}");
        assert!(need.fixed < 2400 << 10, "{need:?}");
        assert_eq!(need.cache_max, 4096 * (1024 + CACHE_ENTRY_OVERHEAD));
        assert_eq!(need.cache_min, 32 * (1024 + CACHE_ENTRY_OVERHEAD));
        assert!(
            what.starts_with("a 2040 KiB block allocation table for 522240 blocks of 4096 KiB"),
            "{what}"
        );
    }
}
