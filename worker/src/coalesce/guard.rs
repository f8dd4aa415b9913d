//! What the served image is wrapped in while a merge copies: guest writes
//! hold their chunks' stripes shared (a stream step holds its chunk's
//! stripe exclusively, so parent data never lands over a guest write) and
//! mark their chunks dirty once written (a commit copies a dirty chunk
//! again). Writes that would bypass this (direct mappings) are turned
//! into ordinary ones for the merge's duration.

use crate::image::{DirectFile, Extent, Image, ImageError, LayerStats, Mapping, SyncFiles};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Bytes one merge step copies (and one dirty bit covers).
pub const CHUNK: u64 = 256 << 10;
/// Lock stripes; chunk `c` is guarded by stripe `c % STRIPES`.
const STRIPES: usize = 64;

/// State shared by the wrapper and the merge job.
#[derive(Debug)]
pub struct Guards {
    stripes: Vec<RwLock<()>>,
    /// One bit per chunk written by the guest since its bit was cleared.
    dirty: Vec<AtomicU64>,
    chunks: u64,
}

impl Guards {
    pub fn new(size: u64) -> Guards {
        let chunks = size.div_ceil(CHUNK);
        Guards {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            dirty: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks,
        }
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Hold chunk `c` against guest writes (a stream step).
    pub fn exclusive(&self, c: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(c % STRIPES as u64) as usize]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Clear chunk `c`'s dirty bit; whether it was set.
    pub fn take_dirty(&self, c: u64) -> bool {
        let bit = 1u64 << (c % 64);
        self.dirty[(c / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    fn mark(&self, first: u64, last: u64) {
        for c in first..=last.min(self.chunks.saturating_sub(1)) {
            self.dirty[(c / 64) as usize].fetch_or(1u64 << (c % 64), Ordering::AcqRel);
        }
    }

    /// Read guards on every stripe `[off, off + len)` touches, in stripe
    /// order (so two writers never wait on each other in a cycle).
    fn shared(&self, first: u64, last: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|c| (c % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].read().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }
}

/// The served image during a merge.
#[derive(Debug)]
pub struct Merging {
    pub inner: Arc<dyn Image>,
    pub guards: Arc<Guards>,
}

impl Merging {
    fn write<T>(
        &self,
        off: u64,
        len: u64,
        f: impl FnOnce() -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        if len == 0 {
            return f();
        }
        let (first, last) = (off / CHUNK, (off + len - 1) / CHUNK);
        let held = self.guards.shared(first, last);
        let r = f();
        // Marked after the write landed: a commit step that cleared the
        // bit before reading sees it set again and copies once more.
        self.guards.mark(first, last);
        drop(held);
        r
    }
}

impl Image for Merging {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.inner.read_at(buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        self.inner.read_at_nowait(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.write(offset, buf.len() as u64, || {
            self.inner.write_at(buf, offset)
        })
    }
    fn flush(&self) -> Result<(), ImageError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write(offset, len, || self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.write(offset, len, || {
            self.inner.write_zeroes(offset, len, may_unmap)
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.inner.block_status(offset, len)
    }
    fn stats(&self) -> Vec<LayerStats> {
        self.inner.stats()
    }
    fn direct_files(&self) -> Vec<DirectFile> {
        self.inner.direct_files()
    }
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<Mapping> {
        if write {
            None
        } else {
            self.inner.map_direct(offset, len, false)
        }
    }
    fn direct_done(&self, mapping: &Mapping, ok: bool) {
        self.inner.direct_done(mapping, ok)
    }
    fn direct_sync(&self) -> Option<SyncFiles> {
        self.inner.direct_sync()
    }
    fn vhd(&self) -> Option<&crate::image::vhd::VhdImage> {
        self.inner.vhd()
    }
}
