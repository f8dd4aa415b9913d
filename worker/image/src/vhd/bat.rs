//! The block allocation table: one big-endian u32 per block, the sector
//! where the block (bitmap, then data) starts, or all ones if unallocated.

use super::endian::be32;
use crate::{Backing, ImageError};

pub const UNUSED: u32 = 0xFFFF_FFFF;

/// Bytes the BAT of `entries` entries occupies on disk (padded to a sector).
pub fn table_bytes(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(512) * 512
}

/// Bytes of the BAT read at a time: the table is decoded chunk by chunk
/// into its final vector, so opening a large image needs the table's size
/// in memory once, not twice (a worker's memory is locked and bounded).
const READ_CHUNK: usize = 64 << 10;

/// Read the first `entries` BAT entries at `offset`. A table that does not
/// fit in the process's memory is refused with a clear error instead of
/// aborting the process.
pub fn read(file: &dyn Backing, offset: u64, entries: u32) -> Result<Vec<u32>, ImageError> {
    let n = usize::try_from(entries)
        .map_err(|_| ImageError::corrupt("header.max_table_entries", "too large"))?;
    let mut table = Vec::new();
    table.try_reserve_exact(n).map_err(|_| {
        ImageError::Unsupported(format!(
            "its block allocation table ({} KiB for {entries} blocks) does not fit in this \
             process's memory (a worker's is locked and limited by RLIMIT_MEMLOCK): give \
             workers more (worker_memlock_mib) or use an image with larger blocks",
            u64::from(entries) * 4 / 1024
        ))
    })?;
    let mut buf = vec![0u8; READ_CHUNK.min(n * 4)];
    while table.len() < n {
        let k = (n - table.len()).min(READ_CHUNK / 4);
        let at = offset + table.len() as u64 * 4;
        file.read_exact_at(&mut buf[..k * 4], at)
            .map_err(ImageError::io("read BAT", at))?;
        table.extend(buf[..k * 4].chunks_exact(4).map(|c| be32(c, 0)));
    }
    Ok(table)
}

/// Serialize entries, padded with [`UNUSED`] to `table_bytes`.
pub fn encode(entries: &[u32], total_entries: u32) -> Vec<u8> {
    let len = table_bytes(total_entries) as usize;
    let mut out = vec![0xffu8; len];
    for (i, e) in entries.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bat_encodes_big_endian_and_pads() {
        let b = encode(&[1, UNUSED], 3);
        assert_eq!(b.len(), 512);
        assert_eq!(&b[..4], &[0, 0, 0, 1]);
        assert_eq!(&b[4..12], &[0xff; 8]);
        assert_eq!(table_bytes(128), 512);
        assert_eq!(table_bytes(129), 1024);
    }
}
