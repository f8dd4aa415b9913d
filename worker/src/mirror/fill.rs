//! `-r` on a leaf (blktap's lcache in leaf mode, SM's IntelliCache leaf
//! call): what a read brought up from below the leaf (the secondary, the
//! cache, gold) is written back into the leaf, never to the secondary
//! (blktap's `skip_mirror`), so the VM's next read of it is local.
//!
//! A fill must never overwrite a guest write that raced it. Guest writes
//! to the leaf hold the stripe locks of the 64 KiB chunks they touch
//! (the same striping the online coalesce uses for its steps); a fill
//! takes them too, then looks again at which of its sectors the leaf
//! still lacks and writes only those. A guest write either made its
//! sectors present before the fill looked (the fill skips them) or comes
//! after the fill (and overwrites it), so the leaf always ends with the
//! guest's data. The bytes a fill writes were read from below before the
//! lock; below changes only by guest writes, which reach the leaf first.
//!
//! A fill is best effort: one that fails is dropped (the read was already
//! served), and after an out-of-space fill no more are tried, so the fills
//! never use the room the guest's own writes need (blktap also stops
//! below 2 MiB free; a confined tapdisk cannot statfs, so it stops at the
//! first ENOSPC instead).

use crate::image::vhd::VhdImage;
use crate::image::{ImageError, SECTOR_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use tapjail_common::read_cache::ReadCacheStats;

/// Chunk size of the stripe locks.
const CHUNK: u64 = 64 * 1024;
/// Stripes (a chunk's lock is `chunk % STRIPES`).
const STRIPES: usize = 64;

/// Leaf-mode fills and their counters.
#[derive(Debug)]
pub struct Fill {
    stripes: Vec<Mutex<()>>,
    stopped: AtomicBool,
    misses: AtomicU64,
    filled: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Default for Fill {
    fn default() -> Self {
        Fill {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            stopped: AtomicBool::new(false),
            misses: AtomicU64::new(0),
            filled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }
}

impl Fill {
    /// Hold the stripes of every chunk `[offset, offset+len)` touches, in
    /// ascending order (no two holders can deadlock).
    pub fn lock(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = offset / CHUNK;
        let last = (offset + len.max(1) - 1) / CHUNK;
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64 - 1))
            .map(|c| (c % STRIPES as u64) as usize)
            .collect();
        if last - first >= STRIPES as u64 {
            idx = (0..STRIPES).collect();
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// `data`, read from below `leaf`'s leaf at `offset`, goes into the
    /// sectors the leaf still lacks. Never fails the read.
    pub fn fill(&self, leaf: &VhdImage, data: &[u8], offset: u64) {
        self.misses
            .fetch_add(data.len() as u64 / SECTOR_SIZE, Relaxed);
        if self.stopped.load(Relaxed) {
            return;
        }
        // Whole sectors only.
        let start = offset.next_multiple_of(SECTOR_SIZE);
        let end = (offset + data.len() as u64) / SECTOR_SIZE * SECTOR_SIZE;
        if end <= start {
            return;
        }
        let _held = self.lock(start, end - start);
        let layer = leaf.leaf();
        let mut pos = start;
        while pos < end {
            let (n, loc) = match layer.map(pos, end - pos) {
                Ok(r) => r,
                Err(e) => return self.failed(&e),
            };
            let n = n.clamp(SECTOR_SIZE, end - pos);
            if loc.is_none() {
                let at = (pos - offset) as usize;
                if let Err(e) = layer.write_sectors(&data[at..at + n as usize], pos) {
                    return self.failed(&e);
                }
                self.filled.fetch_add(n / SECTOR_SIZE, Relaxed);
            }
            pos += n;
        }
    }

    fn failed(&self, e: &ImageError) {
        self.errors.fetch_add(1, Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
            tapjail_common::log_line!(
                "tapdisk: a leaf fill failed ({e}); the read was served from below"
            );
        }
        if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT) {
            self.stopped.store(true, Relaxed);
        }
    }

    /// For `stats`, as a read cache's (`read_cache`): sectors read from
    /// below the leaf (misses) and written back into it (filled).
    pub fn stats(&self) -> ReadCacheStats {
        ReadCacheStats {
            hits: 0,
            misses: self.misses.load(Relaxed),
            filled: self.filled.load(Relaxed),
            fill_errors: self.errors.load(Relaxed),
            reset: None,
            fill_error: self
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::vhd::create::{create, CreateKind, ParentSpec};
    use crate::image::vhd::{VhdLayer, DEFAULT_BLOCK_SIZE};
    use crate::image::Image;

    /// A differencing leaf opened alone: its absent sectors are per sector.
    fn leaf() -> VhdImage {
        let f = tempfile::tempfile().unwrap();
        let parent = ParentSpec {
            uuid: [7; 16],
            timestamp: 1,
            name: "gold.vhd".into(),
            locators: vec![],
        };
        let kind = CreateKind::Differencing {
            block_size: DEFAULT_BLOCK_SIZE,
            parent,
        };
        create(&f, 4 << 20, &kind).unwrap();
        let layer = VhdLayer::open(Box::new(f), "leaf", false, Default::default()).unwrap();
        VhdImage::from_layers(vec![layer]).unwrap()
    }

    /// The race's outcome, made deterministic: a guest write that made
    /// its sectors present before the fill looked is never overwritten
    /// by the (older) bytes the fill read from below.
    #[test]
    fn a_fill_writes_only_the_sectors_the_leaf_still_lacks() {
        let leaf = leaf();
        leaf.write_at(&[0x11; 4096], 8192).unwrap();
        let fill = Fill::default();
        fill.fill(&leaf, &[0xEE; 16384], 0);
        let mut got = vec![0u8; 16384];
        leaf.read_at(&mut got, 0).unwrap();
        assert!(got[..8192].iter().all(|&b| b == 0xEE));
        assert!(
            got[8192..12288].iter().all(|&b| b == 0x11),
            "the guest's write stays"
        );
        assert!(got[12288..].iter().all(|&b| b == 0xEE));
        let s = fill.stats();
        assert_eq!((s.misses, s.filled, s.fill_errors), (32, 24, 0));
        // A fill that is not whole sectors fills only the whole ones.
        fill.fill(&leaf, &[0x22; 1000], 20000);
        leaf.read_at(&mut got[..1024], 19968).unwrap();
        assert!(
            got[..512].iter().all(|&b| b == 0),
            "partial sector left alone"
        );
        assert!(
            got[512..1000].iter().all(|&b| b == 0x22),
            "whole sector filled"
        );
    }

    #[test]
    fn stripes_of_a_range_are_taken_once_each_in_order() {
        let fill = Fill::default();
        assert_eq!(fill.lock(0, 1).len(), 1);
        assert_eq!(fill.lock(CHUNK - 512, 1024).len(), 2);
        assert_eq!(fill.lock(0, CHUNK * 200).len(), STRIPES);
    }
}
