//! BAT entries of blocks allocated with `sync_metadata` off (offline bulk
//! writers: convert, coalesce), kept in memory until the next flush.
//!
//! Written as soon as the block is, an entry could reach the disk before
//! the block's data, bitmap or the file length that covers it, and a power
//! cut would leave a BAT pointing past the end of the file (the image no
//! longer opens) or at bytes nobody wrote. So the flush first syncs the
//! data, then writes the entries, then syncs again: a crash leaves each
//! entry either unused (its block is unreferenced space at the end) or
//! pointing at a block that is on disk. Found by the crash harness
//! (`worker/image/tests/crash`, workload `coalesce`).

use super::{lock, VhdLayer};
use crate::ImageError;

impl VhdLayer {
    /// Whether some new block's BAT entry is still only in memory (a flush
    /// must write it: a plain data sync is not a full flush).
    pub fn bat_pending(&self) -> bool {
        self.sparse
            .as_ref()
            .is_some_and(|s| !lock(&s.pending_bat).is_empty())
    }

    /// Write the deferred BAT entries from the in-memory table, in runs of
    /// adjacent entries; with `durable`, after a data sync and followed by
    /// one. On failure the entries stay pending.
    pub(super) fn write_pending_bat(&self, durable: bool) -> Result<(), ImageError> {
        let Some(s) = &self.sparse else { return Ok(()) };
        let mut pending = lock(&s.pending_bat);
        if pending.is_empty() {
            return Ok(());
        }
        if durable {
            self.sync()?;
        }
        pending.sort_unstable();
        pending.dedup();
        let table = s.header.table_offset();
        let bat = s.bat.read().unwrap_or_else(|p| p.into_inner());
        let mut i = 0;
        while i < pending.len() {
            let first = pending[i] as usize;
            let mut end = first + 1;
            while i + 1 < pending.len() && pending[i + 1] as usize == end {
                i += 1;
                end += 1;
            }
            i += 1;
            let bytes: Vec<u8> = bat[first..end]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            let off = table + first as u64 * 4;
            self.file
                .write_all_at(&bytes, off)
                .map_err(ImageError::io("write BAT", off))?;
        }
        drop(bat);
        if durable {
            self.sync()?;
        }
        pending.clear();
        Ok(())
    }
}
