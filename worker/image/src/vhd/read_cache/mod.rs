//! `open -r`, blktap's IntelliCache: the image served is a *read cache* of
//! its parent chain. The leaf (SM's `PARENT.vhdcache`, a differencing VHD
//! made by `vhd-util snapshot` on the shared parent) holds copies of parent
//! sectors; a read of sectors it lacks is served from the parents and then
//! written into it, so the next read of them stays local. The guest never
//! writes: [`ReadCacheImage`] is read-only whatever the leaf's file allows.
//!
//! Why the cache never serves wrong data:
//! - every sector it holds was read from the parent it is tied to, and the
//!   tie (parent UUID and modification time, in the VHD header as any
//!   child records them) is checked at open; a changed parent empties the
//!   cache first ([`open`]);
//! - the VHD engine makes a sector's data durable before the sector is
//!   marked present (a new block: data, sync, BAT entry; an allocated one:
//!   data, sync, bitmap bit), so a crash mid-fill leaves a sector missing,
//!   never present with bytes it did not get;
//! - fills never race a guest write, since there is none.
//!
//! blktap's `block-lcache.c` does the same fill (it writes parent data
//! back into the leaf); we follow its file format so SM's `.vhdcache`
//! files are used as they are.

mod open;

pub use open::{open, Opened};

use super::image::VhdImage;
use crate::{Extent, Image, ImageError, LayerStats, SECTOR_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tapjail_common::read_cache::ReadCacheStats;

/// Counters of one read cache; shared with whoever reports stats.
#[derive(Debug, Default)]
pub struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    filled: AtomicU64,
    fill_errors: AtomicU64,
    /// Set by the first failed fill: the cache then stops filling (a full
    /// cache root would otherwise cost a failed allocation per read).
    fill_off: AtomicBool,
    reset: Mutex<Option<String>>,
    fill_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Counters {
    pub fn snapshot(&self) -> ReadCacheStats {
        ReadCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            filled: self.filled.load(Ordering::Relaxed),
            fill_errors: self.fill_errors.load(Ordering::Relaxed),
            reset: lock(&self.reset).clone(),
            fill_error: lock(&self.fill_error).clone(),
        }
    }
}

/// A VHD chain whose leaf caches its parents' sectors (see the module doc).
#[derive(Debug)]
pub struct ReadCacheImage {
    chain: VhdImage,
    counters: Arc<Counters>,
}

impl ReadCacheImage {
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The chain, leaf (the cache) first.
    pub fn chain(&self) -> &VhdImage {
        &self.chain
    }

    /// Write what was just read from the parents into the cache: whole
    /// sectors only (a partial one is left for a later read). A failure
    /// costs nothing but the caching: the data read is right either way.
    fn fill(&self, data: &[u8], offset: u64) {
        if self.counters.fill_off.load(Ordering::Relaxed) {
            return;
        }
        let end = offset + data.len() as u64;
        let a = offset.next_multiple_of(SECTOR_SIZE);
        let b = end / SECTOR_SIZE * SECTOR_SIZE;
        if b <= a {
            return;
        }
        let piece = &data[(a - offset) as usize..(b - offset) as usize];
        match self.chain.leaf().write_sectors(piece, a) {
            Ok(()) => {
                self.counters
                    .filled
                    .fetch_add((b - a) / SECTOR_SIZE, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.fill_errors.fetch_add(1, Ordering::Relaxed);
                if !self.counters.fill_off.swap(true, Ordering::Relaxed) {
                    *lock(&self.counters.fill_error) = Some(format!(
                        "{}: {e}; reads are served from the parent without caching",
                        self.chain.leaf().name()
                    ));
                }
            }
        }
    }
}

/// Sectors touched by `len` bytes at `off` (partial ones included).
fn sectors(off: u64, len: u64) -> u64 {
    (off + len).div_ceil(SECTOR_SIZE) - off / SECTOR_SIZE
}

impl Image for ReadCacheImage {
    fn virtual_size(&self) -> u64 {
        self.chain.virtual_size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let size = self.virtual_size();
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= size => {}
            _ => {
                return Err(ImageError::OutOfRange {
                    offset,
                    len: buf.len() as u64,
                    size,
                })
            }
        }
        let leaf = self.chain.leaf();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let max = (buf.len() - done) as u64;
            let (n, loc) = leaf.map(off, max)?;
            let n = n.clamp(1, max) as usize;
            let piece = &mut buf[done..done + n];
            match loc {
                Some(file_off) => {
                    leaf.read_data(piece, file_off)?;
                    self.counters
                        .hits
                        .fetch_add(sectors(off, n as u64), Ordering::Relaxed);
                }
                None => {
                    self.chain.read_parents(piece, off)?;
                    self.counters
                        .misses
                        .fetch_add(sectors(off, n as u64), Ordering::Relaxed);
                    self.fill(piece, off);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), ImageError> {
        Err(ImageError::ReadOnly)
    }

    fn flush(&self) -> Result<(), ImageError> {
        // Fills are durable when made; this writes the batmap hint too.
        self.chain.flush()
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<(), ImageError> {
        Err(ImageError::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<(), ImageError> {
        Err(ImageError::ReadOnly)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.chain.block_status(offset, len)
    }

    fn stats(&self) -> Vec<LayerStats> {
        self.chain.stats()
    }

    fn direct_files(&self) -> Vec<crate::DirectFile> {
        self.chain.direct_files()
    }

    /// Hits only: a read whose every piece the cache (file 0) holds maps
    /// straight onto it; anything the parents would serve must go through
    /// [`Image::read_at`] to be filled. The cache's present sectors never
    /// change while it is served, so such a mapping cannot go stale.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<crate::Mapping> {
        if write {
            return None;
        }
        let m = self.chain.map_direct(offset, len, false)?;
        m.segments()
            .iter()
            .all(|s| matches!(s.target, crate::Target::File { file: 0, .. }))
            .then_some(m)
    }

    fn direct_done(&self, mapping: &crate::Mapping, ok: bool) {
        self.chain.direct_done(mapping, ok);
        if ok {
            self.counters
                .hits
                .fetch_add(mapping.total() / SECTOR_SIZE, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
