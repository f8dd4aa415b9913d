//! The write path: sectors written into allocated blocks, blocks
//! allocated (placed, bitmap and BAT written in the order a crash
//! tolerates) and undone when a step fails.

use super::{aligned_block_start, budget, lock, Sparse, VhdLayer, BITMAP_SHARDS};
use crate::vhd::bat::UNUSED;
use crate::vhd::bitmap;
use crate::vhd::footer::FOOTER_SIZE;
use crate::zeroes::{ZEROES, ZERO_CHUNK};
use crate::ImageError;

impl VhdLayer {
    /// Write whole sectors at a sector-aligned `offset` within the disk.
    pub fn write_sectors(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        debug_assert!(offset.is_multiple_of(512) && buf.len().is_multiple_of(512));
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if let Some(c) = &self.cipher {
            let mut enc = buf.to_vec();
            c.encrypt(&mut enc, offset / 512);
            let r = self.write_sectors_inner(&enc, offset);
            return self.counters.on_write(buf.len() as u64, r);
        }
        let r = self.write_sectors_inner(buf, offset);
        self.counters.on_write(buf.len() as u64, r)
    }

    fn write_sectors_inner(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        let Some(s) = &self.sparse else {
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(ImageError::io("write", offset));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let block = (off >> s.block_shift) as usize;
            let in_block = off & (s.block_size - 1);
            let n = ((s.block_size - in_block) as usize).min(buf.len() - done);
            self.write_in_block(s, block, in_block, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_in_block(
        &self,
        s: &Sparse,
        block: usize,
        in_block: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let entry = s.bat.read().unwrap_or_else(|p| p.into_inner())[block];
        if entry == UNUSED {
            return self.allocate(s, block, in_block, data);
        }
        self.verify_hint(s, block, entry, true)?;
        let off = u64::from(entry) * 512 + s.bitmap_bytes + in_block;
        self.file
            .write_all_at(data, off)
            .map_err(ImageError::io("write", off))?;
        if !Self::is_full(s, block) {
            let first = (in_block / 512) as usize;
            self.mark_sectors(s, block, entry, first, data.len() / 512)?;
        }
        Ok(())
    }

    /// Set bitmap bits after their data was written.
    fn mark_sectors(
        &self,
        s: &Sparse,
        block: usize,
        entry: u32,
        first: usize,
        count: usize,
    ) -> Result<(), ImageError> {
        let mut shard = lock(&s.bitmaps[block % BITMAP_SHARDS]);
        if Self::is_full(s, block) {
            return Ok(());
        }
        let current = self.bitmap_locked(s, &mut shard, block, entry)?;
        if Self::is_full(s, block) {
            return Ok(());
        }
        let mut map = current.to_vec();
        if !bitmap::set_range(&mut map, first, count) {
            return Ok(());
        }
        // Always, even with `sync_metadata` off: a bit that reached the
        // disk before its data would show bytes nobody wrote (zeroes
        // instead of the parent's data, in a differencing image).
        // Bulk writers rarely get here: their new blocks are full.
        self.sync()?;
        // Write only the bitmap sectors that changed.
        let lo = (first / 8) / 512 * 512;
        let hi = ((first + count - 1) / 8 / 512 + 1) * 512;
        let off = u64::from(entry) * 512 + lo as u64;
        self.file
            .write_all_at(&map[lo..hi], off)
            .map_err(ImageError::io("write bitmap", off))?;
        if bitmap::is_full(&map, s.sectors_per_block) {
            shard.remove(&(block as u32));
            self.set_full(s, block, true);
        } else {
            budget::cache_insert(s, &mut shard, block, map.into());
        }
        Ok(())
    }

    /// Allocate `block` at the end of the file with `data` at `in_block`.
    fn allocate(
        &self,
        s: &Sparse,
        block: usize,
        in_block: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let mut alloc = lock(&s.alloc);
        // Another writer may have allocated it while we waited.
        if s.bat.read().unwrap_or_else(|p| p.into_inner())[block] != UNUSED {
            drop(alloc);
            return self.write_in_block(s, block, in_block, data);
        }
        let gap_start = alloc.data_end;
        let start = aligned_block_start(gap_start, s.bitmap_bytes).ok_or_else(|| {
            ImageError::NoSpace(format!(
                "{}: the file would grow past 2^64 bytes",
                self.name
            ))
        })?;
        let sector = u32::try_from(start / 512)
            .ok()
            .filter(|&x| x != UNUSED)
            .ok_or_else(|| {
                ImageError::NoSpace(format!(
                    "{}: the file would grow past what a BAT entry can address",
                    self.name
                ))
            })?;
        let data_start = start + s.bitmap_bytes;
        let block_end = data_start + s.block_size;
        let mut map = vec![0u8; s.bitmap_bytes as usize];
        let first = (in_block / 512) as usize;
        if s.differencing || self.cipher.is_some() {
            // Encrypted: the zero-filled rest is not ciphertext of zeroes,
            // so only the sectors written are present (blktap marks
            // exactly those too); the others read as holes.
            bitmap::set_range(&mut map, first, data.len() / 512);
        } else {
            // A dynamic image reads clear sectors as zero and so does the
            // zero-filled data area: mark it all present (as qemu does), so
            // the block is full and never needs its bitmap again.
            bitmap::set_range(&mut map, 0, s.sectors_per_block);
        }
        let full = bitmap::is_full(&map, s.sectors_per_block);
        // The end footer, if the block goes over it, to put back if the
        // allocation fails half-way (a full disk): the image then stays
        // exactly as valid as it was. Nothing else there needs saving:
        // everything from `data_end` on but that footer is referenced by
        // no BAT entry (say, a block a crash left unlinked), and copying
        // it could mean megabytes of locked memory in the worker.
        let old_len = alloc.file_len;
        let saved_at = old_len.saturating_sub(FOOTER_SIZE as u64).max(gap_start);
        let saved_end = old_len.min(block_end + FOOTER_SIZE as u64);
        let mut saved = [0u8; FOOTER_SIZE];
        let saved = &mut saved[..saved_end.saturating_sub(saved_at) as usize];
        self.file
            .read_exact_at(saved, saved_at)
            .map_err(ImageError::io("read", saved_at))?;
        let table = s.header.table_offset() + block as u64 * 4;
        let mut bat_written = false;
        let placed = self.place_block(
            &map,
            data,
            (gap_start, data_start, in_block, block_end, old_len),
            (table, sector),
            &mut bat_written,
        );
        if let Err(e) = placed {
            self.undo_allocation(table, bat_written, old_len, saved_at, saved);
            return Err(e);
        }
        alloc.data_end = block_end;
        alloc.file_len = alloc.file_len.max(block_end + FOOTER_SIZE as u64);
        if full {
            self.set_full(s, block, true);
        } else {
            budget::cache_insert(
                s,
                &mut lock(&s.bitmaps[block % BITMAP_SHARDS]),
                block,
                map.into(),
            );
        }
        s.bat.write().unwrap_or_else(|p| p.into_inner())[block] = sector;
        // After the in-memory entry: a flush then writes the new value.
        if !self.options.sync_metadata {
            lock(&s.pending_bat).push(block as u32);
        }
        Ok(())
    }

    /// The writes of a block allocation, in their crash-safe order:
    /// bitmap and data, the rest of the block and the alignment gap before
    /// it zeroed, then the BAT entry, then the footer at the new end.
    /// `bat_written` says how far it got.
    fn place_block(
        &self,
        map: &[u8],
        data: &[u8],
        (gap_start, data_start, in_block, block_end, file_len): (u64, u64, u64, u64, u64),
        (table, sector): (u64, u32),
        bat_written: &mut bool,
    ) -> Result<(), ImageError> {
        let io = |r: std::io::Result<()>, op, off| r.map_err(ImageError::io(op, off));
        let start = data_start - map.len() as u64;
        io(self.file.write_all_at(map, start), "write bitmap", start)?;
        let wstart = data_start + in_block;
        io(self.file.write_all_at(data, wstart), "write", wstart)?;
        // Whatever the file already holds in the rest of the data area (an
        // old footer, stale bytes) must read as zero.
        let wend = wstart + data.len() as u64;
        self.zero_existing(gap_start, start, file_len)?;
        self.zero_existing(data_start, wstart, file_len)?;
        self.zero_existing(wend, block_end, file_len)?;
        // The whole block must be inside the file before the BAT points at
        // it (the footer that will follow it may be lost in a crash).
        if file_len.max(wend) < block_end {
            self.file
                .set_len(block_end)
                .map_err(ImageError::io("extend", block_end))?;
        }
        // Without `sync_metadata` the entry waits for the next flush
        // (`deferred_bat`): written now, it could reach the disk before
        // the block does.
        if self.options.sync_metadata {
            self.sync()?;
            io(
                self.file.write_all_at(&sector.to_be_bytes(), table),
                "write BAT",
                table,
            )?;
            *bat_written = true;
            self.sync()?;
        }
        io(
            self.file.write_all_at(&self.footer_bytes, block_end),
            "write footer",
            block_end,
        )
    }

    /// Best-effort return to the state before a failed allocation: no BAT
    /// entry, the old length, the old bytes (the old end footer) at
    /// `start`. Shrinking first gives back the space the new block took,
    /// so on a full disk the old bytes fit again. If the BAT entry cannot
    /// be taken back (or made durable), nothing else is undone: the entry
    /// must keep pointing at a block that lies inside the file.
    fn undo_allocation(
        &self,
        table: u64,
        bat_written: bool,
        old_len: u64,
        start: u64,
        saved: &[u8],
    ) {
        if bat_written {
            let cleared = self.file.write_all_at(&UNUSED.to_be_bytes(), table);
            if cleared.is_err() || (self.options.sync_metadata && self.sync().is_err()) {
                return;
            }
        }
        let _ = self.file.set_len(old_len);
        let _ = self.file.write_all_at(saved, start);
        if self.options.sync_metadata {
            let _ = self.sync();
        }
    }

    /// Write zeroes over `[from, to)` where it lies inside the first
    /// `file_len` bytes.
    fn zero_existing(&self, from: u64, to: u64, file_len: u64) -> Result<(), ImageError> {
        let to = to.min(file_len);
        self.write_zero_bytes(from, to)
    }

    fn write_zero_bytes(&self, mut from: u64, to: u64) -> Result<(), ImageError> {
        if from >= to {
            return Ok(());
        }
        while from < to {
            let n = (to - from).min(ZERO_CHUNK as u64) as usize;
            self.file
                .write_all_at(&ZEROES[..n], from)
                .map_err(ImageError::io("write", from))?;
            from += n as u64;
        }
        Ok(())
    }
}
