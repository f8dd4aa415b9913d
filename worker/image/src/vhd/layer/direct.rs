//! The layer's side of direct mappings (see [`crate::direct`]):
//! whether a flush needs more than a data sync, and deallocation that
//! respects pinned blocks. The lookups themselves are
//! [`VhdLayer::map_cached`], answered from metadata in memory only, so a
//! frontend may call them on a thread that must never block.

use super::{lock, Sparse, VhdLayer, BITMAP_SHARDS, UNUSED};
use crate::ImageError;
use std::sync::atomic::Ordering;

impl VhdLayer {
    /// The batmap changed since it was last written (a flush must write it,
    /// so a plain data sync is not a full flush).
    pub fn batmap_dirty(&self) -> bool {
        self.sparse
            .as_ref()
            .is_some_and(|s| s.batmap.is_some() && s.batmap_dirty.load(Ordering::Acquire))
    }

    /// Deallocate a whole block of a dynamic image unless `busy()` says a
    /// direct mapping may point into it; `Ok(false)` when it was busy (the
    /// caller zeroes the block by writing instead).
    ///
    /// Order: under the allocation lock, the in-memory BAT entry is cleared
    /// and `busy` checked under the BAT *write* lock, in one critical
    /// section. A mapper pins before it takes the BAT read lock, so either
    /// its pin is seen here, or its lookup comes after and finds the block
    /// unallocated: no mapping can point into a block once it is freed.
    /// Then the on-disk BAT entry, a sync, and the space is given back. A
    /// failed BAT write puts the in-memory entry back (nothing can have
    /// reallocated the block: that needs the allocation lock we hold).
    /// Never used on differencing images, where it would expose the
    /// parent's data.
    pub fn deallocate_unless(
        &self,
        block: usize,
        busy: impl FnOnce() -> bool,
    ) -> Result<bool, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let Some(s) = self.sparse.as_ref().filter(|s| !s.differencing) else {
            return Err(ImageError::InvalidArgument(
                "only dynamic images deallocate blocks".into(),
            ));
        };
        let _alloc = lock(&s.alloc);
        let entry = {
            let mut bat = s.bat.write().unwrap_or_else(|p| p.into_inner());
            let Some(slot) = bat.get_mut(block) else {
                return Err(ImageError::InvalidArgument(format!(
                    "block {block} is beyond the BAT"
                )));
            };
            let entry = *slot;
            if entry == UNUSED {
                return Ok(true);
            }
            if busy() {
                return Ok(false);
            }
            *slot = UNUSED;
            entry
        };
        if let Err(e) = self.write_unused_entry(s, block) {
            s.bat.write().unwrap_or_else(|p| p.into_inner())[block] = entry;
            return Err(e);
        }
        lock(&s.bitmaps[block % BITMAP_SHARDS]).remove(&(block as u32));
        self.set_full(s, block, false);
        let start = u64::from(entry) * 512;
        match self.file.punch_hole(start, s.bitmap_bytes + s.block_size) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(true),
            Err(e) => Err(ImageError::io("punch hole", start)(e)),
        }
    }

    fn write_unused_entry(&self, s: &Sparse, block: usize) -> Result<(), ImageError> {
        let table = s.header.table_offset() + block as u64 * 4;
        self.file
            .write_all_at(&UNUSED.to_be_bytes(), table)
            .map_err(ImageError::io("write BAT", table))?;
        if self.options.sync_metadata {
            self.sync()?;
        }
        Ok(())
    }
}
