//! An [`Image`] that records every change in the disk's bitmaps before
//! passing it on: the one place writes, zeroing and discards are tracked,
//! whatever frontend sent them.

use super::Tracker;
use crate::image::{DirectFile, Extent, Image, ImageError, LayerStats, Mapping, SyncFiles};
use std::sync::Arc;

#[derive(Debug)]
pub struct Tracked {
    inner: Arc<dyn Image>,
    tracker: Arc<Tracker>,
}

impl Tracked {
    pub fn wrap(inner: Arc<dyn Image>, tracker: Arc<Tracker>) -> Arc<dyn Image> {
        Arc::new(Tracked { inner, tracker })
    }

    fn mark(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        if self.inner.read_only() {
            // The image refuses the write itself; nothing changes.
            return Ok(());
        }
        self.tracker.mark(offset, len).map_err(ImageError::io(
            "recording a changed block in the CBT log",
            offset,
        ))
    }
}

impl Image for Tracked {
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
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.mark(offset, len)?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.mark(offset, len)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.mark(offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap)
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

    /// A direct write skips [`Image::write_at`], so it is offered only
    /// where every bitmap has the blocks on disk already; otherwise the
    /// frontend takes the `write_at` path, which marks them first.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<Mapping> {
        if write && !self.tracker.covered(offset, len) {
            return None;
        }
        self.inner.map_direct(offset, len, write)
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
