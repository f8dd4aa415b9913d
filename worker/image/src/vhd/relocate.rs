//! Moving a data block to the end of the file, crash-safely: the block a
//! grown BAT needs to cover (`resize`), or one an older tool left in front
//! of the metadata (`repair`). blktap's tools reject a block that lies
//! before the end of the headers ("block N clobbers headers"), so
//! metadata stays first and blocks move instead.
//!
//! Order: the footer after the new place, then the copy, flush, then the
//! one 4-byte BAT entry, flush. Until that entry is durable the copy is
//! unreferenced; after it, the old place is. A crash at any write leaves
//! an image that reads the same data.

use super::layer::aligned_block_start;
use super::layout::Sparse;
use crate::{Backing, ImageError};

/// Bytes copied per read/write while moving a block: bounds memory for
/// blocks of up to `MAX_BLOCK_SIZE`.
const CHUNK: u64 = 1 << 20;

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

/// Allocated blocks (index, start byte) that start before the end of the
/// metadata, in file order: the layout `vhd-util check` calls "block N
/// clobbers headers". Blocks that overlap a structure are not listed
/// (the layout already dropped them as corrupt).
pub fn blocks_before_metadata(s: &Sparse) -> Vec<(u32, u64)> {
    let mut v: Vec<(u32, u64)> = s
        .bat
        .iter()
        .enumerate()
        .filter(|&(_, &e)| e != super::bat::UNUSED)
        .map(|(i, &e)| (i as u32, u64::from(e) * 512)) // i < MAX_BAT_ENTRIES
        .filter(|&(_, start)| start < s.metadata_end)
        .collect();
    v.sort_unstable_by_key(|&(_, start)| start);
    v
}

/// One block to move and where the file's data ends now.
#[derive(Debug)]
pub struct Move<'a> {
    pub file: &'a dyn Backing,
    /// The footer to write after the moved block (the image's current
    /// one: the size does not change here).
    pub footer: &'a [u8; 512],
    pub table_offset: u64,
    pub bitmap_bytes: u32,
    pub block_size: u32,
}

impl Move<'_> {
    /// Move block `idx` from byte `src` to the first place at or after
    /// `end` whose data starts 4 KiB-aligned; returns its new start and
    /// the new end of data (where the end footer now is).
    pub fn block(&self, idx: u32, src: u64, end: u64) -> Result<(u64, u64), ImageError> {
        let total = u64::from(self.bitmap_bytes) + u64::from(self.block_size);
        let bm = u64::from(self.bitmap_bytes);
        let dst = aligned_block_start(end, bm)
            .filter(|d| (d / 512) < u64::from(super::bat::UNUSED))
            .ok_or_else(|| {
                ImageError::InvalidArgument(format!(
                    "block {idx} cannot move past byte {end}: a BAT entry cannot address it"
                ))
            })?;
        let new_end = dst + total;
        // A valid end footer first: the file is complete at every step.
        self.file
            .write_all_at(self.footer, new_end)
            .map_err(io("write footer", new_end))?;
        let mut buf = vec![0u8; total.min(CHUNK) as usize];
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(CHUNK) as usize;
            self.file
                .read_exact_at(&mut buf[..n], src + done)
                .map_err(io("read block", src + done))?;
            self.file
                .write_all_at(&buf[..n], dst + done)
                .map_err(io("write block", dst + done))?;
            done += n as u64;
        }
        self.file.sync_data().map_err(io("fsync", dst))?;
        let entry_off = self.table_offset + u64::from(idx) * 4;
        let entry = (dst / 512) as u32; // checked above
        self.file
            .write_all_at(&entry.to_be_bytes(), entry_off)
            .map_err(io("write BAT", entry_off))?;
        self.file.sync_data().map_err(io("fsync", entry_off))?;
        Ok((dst, new_end))
    }
}
