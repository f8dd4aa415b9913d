//! Growing the BAT (and batmap) past what the header allows, metadata
//! first as blktap lays files out: the BAT grows in place, and blocks in
//! the way move to the end of the file (see [`super::super::relocate`]).
//!
//! The new batmap map and the parent locators go to fresh space past the
//! old metadata, so that nothing the old header points at is overwritten
//! before the header stops pointing at it. Steps, each flushed:
//! 1. blocks that start before the new end of metadata move to the end;
//! 2. the new map and the locators' copies are written (unreferenced);
//! 3. a header pointing at the copied locators (differencing only);
//! 4. the grown BAT and the new batmap header (the old batmap header is
//!    overwritten here: a crash until step 5 leaves an image whose batmap
//!    `check` flags and `repair` rebuilds or drops; its data is intact);
//! 5. the header with the grown table.
//!
//! The caller then writes the footers (copy first, end last).

use super::super::bat::{self, UNUSED};
use super::super::batmap::{self, BatmapHeader};
use super::super::bitmap;
use super::super::endian::round_up_sector;
use super::super::footer::DiskType;
use super::super::header::HEADER_SIZE;
use super::super::layout::{BatmapState, Metadata, Sparse};
use super::super::relocate::Move;
use crate::{Backing, ImageError};

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

/// Where the grown metadata goes.
struct Plan {
    bat_end: u64,
    /// Batmap map offset and sectors (tapdisk images only).
    map: Option<(u64, u32)>,
    /// Locator slot, old offset, new offset, bytes.
    locators: Vec<(usize, u64, u64, u64)>,
    /// First byte after all of it: no block may start before this.
    end: u64,
}

fn overflow() -> ImageError {
    ImageError::InvalidArgument("the grown metadata would not fit a file".into())
}

fn plan(meta: &Metadata, s: &Sparse, new_size: u64, needed: u32) -> Result<Plan, ImageError> {
    let bat_end = s.header.table_offset() + bat::table_bytes(needed);
    let with_batmap = meta.footer.creator_is_tap();
    let after_hdr = bat_end + if with_batmap { 512 } else { 0 };
    let mut p = round_up_sector(s.metadata_end.max(after_hdr)).ok_or_else(overflow)?;
    let map = if with_batmap {
        let sectors = batmap::map_sectors(needed, new_size)?;
        let at = p;
        p += u64::from(sectors) * 512;
        Some((at, sectors))
    } else {
        None
    };
    let mut locators = Vec::new();
    if meta.footer.disk_type == DiskType::Differencing {
        for (i, loc) in s.header.locators.iter().enumerate() {
            let space = loc.space_bytes().unwrap_or(0);
            if loc.is_used() && space > 0 {
                locators.push((i, loc.data_offset, p, space));
                p += space;
            }
        }
    }
    Ok(Plan {
        bat_end,
        map,
        locators,
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
    let table_offset = s.header.table_offset();
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

    // 1. Blocks out of the way.
    let mut entries = s.bat.clone();
    let mover = Move {
        file,
        footer: &old_footer,
        table_offset,
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

    // 2. The new map and the locators' copies, in space nothing uses.
    let mut new_batmap = None;
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
        new_batmap = Some(h);
    }
    let mut header = s.header.clone();
    for &(slot, from, to, len) in &plan.locators {
        let mut data = vec![0u8; len as usize]; // <= MAX_LOCATOR_LEN rounded up
        file.read_exact_at(&mut data, from)
            .map_err(io("read parent locator", from))?;
        file.write_all_at(&data, to)
            .map_err(io("write parent locator", to))?;
        header.locators[slot].data_offset = to;
    }
    file.sync_data().map_err(io("fsync", plan.end))?;

    // 3. The header reads the copied locators (the old ones may lie where
    // the BAT grows).
    let hoff = meta.footer.data_offset();
    if !plan.locators.is_empty() {
        file.write_all_at(&header.to_bytes(), hoff)
            .map_err(io("write header", hoff))?;
        file.sync_data().map_err(io("fsync", hoff))?;
    }

    // 4. The grown BAT, then the batmap header right after it.
    let mut grown = entries;
    grown.resize(needed as usize, UNUSED);
    let table = bat::encode(&grown, needed);
    file.write_all_at(&table, table_offset)
        .map_err(io("write BAT", table_offset))?;
    if let Some(h) = new_batmap {
        file.write_all_at(&h.to_bytes(), plan.bat_end)
            .map_err(io("write batmap", plan.bat_end))?;
    }
    file.sync_data().map_err(io("fsync", table_offset))?;

    // 5. The header switches to the grown table.
    header.set_table(table_offset, needed);
    debug_assert_eq!(header.to_bytes().len(), HEADER_SIZE);
    file.write_all_at(&header.to_bytes(), hoff)
        .map_err(io("write header", hoff))?;
    file.sync_data().map_err(io("fsync", hoff))?;
    Ok(end)
}
