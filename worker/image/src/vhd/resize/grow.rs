//! Growing the BAT (and batmap) past what the header allows, metadata
//! first as blktap lays files out: blocks in the way move to the end of
//! the file (see [`super::super::relocate`]).
//!
//! The grown BAT does not grow in place: it is written, with the batmap
//! right after it, to fresh space past all of the old metadata, and one
//! header write then switches to it. That header write changes only its
//! first sector (table offset, entry count, checksum), so even a write torn
//! into 512-byte sectors at a power cut leaves the old header or the new
//! one, never a mix whose checksum fails. Growing in place would overwrite
//! the parent locators and so need a header that points at copies: a
//! change to both of its sectors, which a torn write leaves unreadable (the
//! crash harness, `worker/image/tests/crash`, found exactly that). The old
//! BAT is left as an unreferenced hole of a few sectors.
//!
//! Steps, each flushed:
//! 1. blocks that start before the new end of metadata move to the end;
//! 2. the grown BAT, the batmap header and map after it (unreferenced);
//! 3. the header's first sector switches to the grown table.
//!
//! The caller then writes the footers (copy first, end last).

use super::super::bat::{self, UNUSED};
use super::super::batmap::{self, BatmapHeader};
use super::super::bitmap;
use super::super::endian::round_up_sector;
use super::super::header::HEADER_SIZE;
use super::super::layout::{BatmapState, Metadata, Sparse};
use super::super::relocate::Move;
use crate::{Backing, ImageError};

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

/// Where the grown metadata goes.
struct Plan {
    table_offset: u64,
    bat_end: u64,
    /// Batmap map offset and sectors (tapdisk images only).
    map: Option<(u64, u32)>,
    /// First byte after all of it: no block may start before this.
    end: u64,
}

fn overflow() -> ImageError {
    ImageError::InvalidArgument("the grown metadata would not fit a file".into())
}

fn plan(meta: &Metadata, s: &Sparse, new_size: u64, needed: u32) -> Result<Plan, ImageError> {
    let table_offset = round_up_sector(s.metadata_end).ok_or_else(overflow)?;
    let bat_end = table_offset
        .checked_add(bat::table_bytes(needed))
        .ok_or_else(overflow)?;
    let with_batmap = meta.footer.creator_is_tap();
    let mut p =
        round_up_sector(bat_end + if with_batmap { 512 } else { 0 }).ok_or_else(overflow)?;
    let map = if with_batmap {
        let sectors = batmap::map_sectors(needed, new_size)?;
        let at = p;
        p += u64::from(sectors) * 512;
        Some((at, sectors))
    } else {
        None
    };
    Ok(Plan {
        table_offset,
        bat_end,
        map,
        end: p,
    })
}

/// Grow the tables of `meta` to `needed` entries for `new_size` bytes;
/// returns where the end footer goes.
pub(super) fn grow(
    file: &dyn Backing,
    meta: &Metadata,
    s: &Sparse,
    new_size: u64,
    needed: u32,
) -> Result<u64, ImageError> {
    let plan = plan(meta, s, new_size, needed)?;
    let old_footer = meta.footer.to_bytes();
    let mut end = s.data_end;
    if end < plan.end {
        // The end footer would lie inside the new metadata: put a copy
        // past it first.
        file.write_all_at(&old_footer, plan.end)
            .map_err(io("write footer", plan.end))?;
        file.sync_data().map_err(io("fsync", plan.end))?;
        end = plan.end;
    }

    // 1. Blocks out of the way (their entries change in the old BAT, which
    // the header still reads until step 3).
    let mut entries = s.bat.clone();
    let mover = Move {
        file,
        footer: &old_footer,
        table_offset: s.header.table_offset(),
        bitmap_bytes: s.bitmap_bytes,
        block_size: s.block_size,
    };
    let mut in_way: Vec<(u32, u64)> = entries
        .iter()
        .enumerate()
        .filter(|&(_, &e)| e != UNUSED && u64::from(e) * 512 < plan.end)
        .map(|(i, &e)| (i as u32, u64::from(e) * 512))
        .collect();
    in_way.sort_unstable_by_key(|&(_, start)| start);
    for (idx, src) in in_way {
        let (start, new_end) = mover.block(idx, src, end)?;
        entries[idx as usize] = (start / 512) as u32; // `block` checked it fits
        end = new_end;
    }

    // 2. The grown BAT, the batmap header and map, in space nothing uses.
    let mut grown = entries;
    grown.resize(needed as usize, UNUSED);
    let table = bat::encode(&grown, needed);
    file.write_all_at(&table, plan.table_offset)
        .map_err(io("write BAT", plan.table_offset))?;
    if let Some((at, sectors)) = plan.map {
        let mut map = vec![0u8; sectors as usize * 512];
        if let BatmapState::Valid { map: old, .. } = &s.batmap {
            // Full blocks stay known as full; the new ones are empty.
            for b in 0..s.bat.len() {
                if b / 8 < old.len() && bitmap::test(old, b) {
                    bitmap::set_range(&mut map, b, 1);
                }
            }
        }
        let sum_len = batmap::checksum_len(new_size) as usize;
        let mut h = BatmapHeader::new(
            at,
            sectors,
            batmap::CURRENT_VERSION,
            batmap::checksum(&map[..sum_len], batmap::CURRENT_VERSION),
        );
        // The marker and keyhash move with the map.
        if let Some(old) = s.batmap_header() {
            h.rest = old.rest;
        }
        file.write_all_at(&map, at)
            .map_err(io("write batmap", at))?;
        file.write_all_at(&h.to_bytes(), plan.bat_end)
            .map_err(io("write batmap", plan.bat_end))?;
    }
    file.sync_data().map_err(io("fsync", plan.table_offset))?;

    // 3. The header switches to the grown table: its first sector only.
    let hoff = meta.footer.data_offset();
    let mut header = s.header.clone();
    header.set_table(plan.table_offset, needed);
    let after = header.to_bytes();
    debug_assert_eq!(after.len(), HEADER_SIZE);
    // Compared with the bytes on disk, not a re-encoding: the checksum
    // must cover what the file will hold.
    let mut on_disk = vec![0u8; HEADER_SIZE];
    file.read_exact_at(&mut on_disk, hoff)
        .map_err(io("read header", hoff))?;
    let changed = if on_disk[512..] == after[512..] {
        &after[..512]
    } else {
        &after[..]
    };
    file.write_all_at(changed, hoff)
        .map_err(io("write header", hoff))?;
    file.sync_data().map_err(io("fsync", hoff))?;
    Ok(end)
}
