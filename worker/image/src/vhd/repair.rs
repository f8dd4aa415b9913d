//! `tap-ctl vhd repair`: fix what can be fixed without guessing at data.
//!
//! - a missing or stale footer (at the end, or the copy at offset 0) is
//!   rewritten from the good one;
//! - a batmap whose contents no longer match its checksum (a crash between
//!   writing the map and its header) is rebuilt from the sector bitmaps;
//! - a batmap that is invalid otherwise or overwritten by data (qemu writes
//!   blocks right after the BAT) is dropped: the creator version becomes 1.1
//!   (so blktap no longer requires one) and an intact header is erased;
//! - a batmap that claims blocks are full when they are not is rebuilt.
//!
//! - both footers damaged (a bad cookie or checksum) while the dynamic
//!   header at 512 is intact: the footer is rebuilt from a damaged copy
//!   whose fields still read as a VHD footer, else from the header and the
//!   layout (size = `max_table_entries` x `block_size`, a new UUID, said in
//!   the report), and the file is never taken for raw;
//!
//! BAT entries pointing outside the file or into metadata are reported,
//! not "fixed": clearing them would lose data silently.

use super::bat::UNUSED;
use super::batmap::{self, BatmapHeader};
use super::bitmap;
use super::check::{check, Problem};
use super::footer::{
    new_uuid, vhd_now, DiskType, Footer, CREATOR_VERSION_OPTIONAL_BATMAP, FOOTER_SIZE,
};
use super::header::{Header, HEADER_SIZE};
use super::layout::{BatmapState, FooterSource, Metadata};
use super::MAX_VIRTUAL_SIZE;
use crate::{Backing, ImageError};

/// What `repair` did and what is still wrong.
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    pub actions: Vec<String>,
    pub remaining: Vec<Problem>,
}

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

pub fn repair(file: &dyn Backing) -> Result<RepairReport, ImageError> {
    repair_with_progress(file, &mut |_, _| {})
}

/// [`repair`], calling `progress(done, total)` in bytes of allocated
/// blocks while a stale batmap is rebuilt from their bitmaps (the only
/// repair that reads every block; the others rewrite metadata).
pub fn repair_with_progress(
    file: &dyn Backing,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RepairReport, ImageError> {
    let mut report = RepairReport::default();
    let meta = match Metadata::read_with(file, false) {
        Ok(m) => m,
        Err(e) => match rebuild_footer(file)? {
            Some((action, meta)) => {
                report.actions.push(action);
                meta
            }
            None => return Err(e),
        },
    };
    if let Some(moved) = move_misplaced_blocks(file, &meta)? {
        // The layout changed: start over from what the file says now.
        let mut rest = repair_with_progress(file, progress)?;
        report.actions.push(moved);
        report.actions.append(&mut rest.actions);
        report.remaining = rest.remaining;
        return Ok(report);
    }
    let mut footer = meta.footer.clone();
    let mut rewrite_footers = !meta.findings.iter().all(|f| f.field != "footer")
        || meta.footer_source == FooterSource::EndShort;

    if let Some(s) = &meta.sparse {
        let spb = (s.block_size / 512) as usize;
        match &s.batmap {
            BatmapState::Ignored {
                reason,
                stale: Some(header),
            } => {
                // Sound header and map whose contents went stale: rebuild
                // the map from the sector bitmaps.
                let sum_len = batmap::checksum_len(footer.current_size()) as usize;
                let mut map = vec![0u8; header.map_bytes() as usize];
                let mut buf = vec![0u8; s.bitmap_bytes as usize];
                let bs = u64::from(s.block_size);
                let total = s
                    .bat
                    .iter()
                    .take(sum_len * 8)
                    .filter(|&&e| e != UNUSED)
                    .count() as u64
                    * bs;
                let mut done = 0;
                for (b, &e) in s.bat.iter().enumerate().take(sum_len * 8) {
                    if e == UNUSED {
                        continue;
                    }
                    done += bs;
                    progress(done, total);
                    let off = u64::from(e) * 512;
                    file.read_exact_at(&mut buf, off)
                        .map_err(io("read bitmap", off))?;
                    if bitmap::is_full(&buf, spb) {
                        bitmap::set_range(&mut map, b, 1);
                    }
                }
                let h = BatmapHeader {
                    version: batmap::CURRENT_VERSION,
                    checksum: batmap::checksum(&map[..sum_len], batmap::CURRENT_VERSION),
                    ..*header
                };
                file.write_all_at(&map, h.offset)
                    .map_err(io("write batmap", h.offset))?;
                file.write_all_at(&h.to_bytes(), s.batmap_header_offset)
                    .map_err(io("write batmap", s.batmap_header_offset))?;
                report
                    .actions
                    .push(format!("rebuilt the batmap ({reason})"));
            }
            BatmapState::Ignored { reason, .. } => {
                footer.set_creator_version(CREATOR_VERSION_OPTIONAL_BATMAP);
                rewrite_footers = true;
                // Erase an intact header so blktap does not try it again;
                // never touch a sector that now belongs to a block.
                let hdr = s.batmap_header_offset;
                let in_block = s.bat.iter().any(|&e| {
                    e != UNUSED && {
                        let start = u64::from(e) * 512;
                        hdr < start + u64::from(s.bitmap_bytes) + u64::from(s.block_size)
                            && start < hdr + 512
                    }
                });
                let mut b = [0u8; 512];
                if !in_block
                    && hdr + 512 <= meta.file_len
                    && file.read_exact_at(&mut b, hdr).is_ok()
                    && &b[..8] == batmap::COOKIE
                {
                    file.write_all_at(&[0u8; 512], hdr)
                        .map_err(io("erase batmap header", hdr))?;
                }
                report
                    .actions
                    .push(format!("dropped the batmap ({reason})"));
            }
            BatmapState::Valid { header, map } => {
                let sum_len = batmap::checksum_len(footer.current_size()) as usize;
                let mut fixed = map.clone();
                let mut changed = 0;
                let mut buf = vec![0u8; s.bitmap_bytes as usize];
                for (b, &e) in s.bat.iter().enumerate() {
                    if b >= sum_len * 8 || !bitmap::test(map, b) {
                        continue;
                    }
                    let full = e != UNUSED && {
                        let off = u64::from(e) * 512;
                        file.read_exact_at(&mut buf, off)
                            .map_err(io("read bitmap", off))?;
                        bitmap::is_full(&buf, spb)
                    };
                    if !full {
                        fixed[b / 8] &= !(0x80 >> (b % 8));
                        changed += 1;
                    }
                }
                if changed > 0 {
                    let h = BatmapHeader {
                        checksum: batmap::checksum(&fixed[..sum_len], header.version),
                        ..*header
                    };
                    file.write_all_at(&fixed, h.offset)
                        .map_err(io("write batmap", h.offset))?;
                    file.write_all_at(&h.to_bytes(), s.batmap_header_offset)
                        .map_err(io("write batmap", s.batmap_header_offset))?;
                    report.actions.push(format!(
                        "cleared {changed} batmap bits of blocks that are not fully written"
                    ));
                }
            }
            BatmapState::Absent => {}
        }
    }

    if rewrite_footers {
        let bytes = footer.to_bytes();
        let end = match &meta.sparse {
            Some(s) => {
                file.write_all_at(&bytes, 0)
                    .map_err(io("write footer", 0))?;
                // Never over or below bytes the file holds: a BAT entry
                // flagged as running past the end (a truncated file) still
                // owns what is left of its block, and an unreferenced
                // block is not known to be garbage. Repair never shrinks.
                let held = if meta.end_footer_ok {
                    meta.file_len - footer_len(meta.footer_source)
                } else {
                    meta.file_len
                };
                s.data_end.max(held.next_multiple_of(512))
            }
            None => meta.file_len - footer_len(meta.footer_source),
        };
        file.write_all_at(&bytes, end)
            .map_err(io("write footer", end))?;
        file.set_len(end + FOOTER_SIZE as u64)
            .map_err(io("truncate", end))?;
        report
            .actions
            .push("rewrote the footers at the start and end of the file".into());
    }
    file.sync_data().map_err(io("fsync", 0))?;
    report.remaining = check(file);
    Ok(report)
}

/// Blocks an older tool put before the end of the metadata (a BAT moved
/// after the data) move to the end of the file, one crash-safe step each;
/// `None` when there are none.
fn move_misplaced_blocks(
    file: &dyn Backing,
    meta: &Metadata,
) -> Result<Option<String>, ImageError> {
    let Some(s) = &meta.sparse else {
        return Ok(None);
    };
    let misplaced = super::relocate::blocks_before_metadata(s);
    if misplaced.is_empty() {
        return Ok(None);
    }
    let footer = meta.footer.to_bytes();
    let mover = super::relocate::Move {
        file,
        footer: &footer,
        table_offset: s.header.table_offset(),
        bitmap_bytes: s.bitmap_bytes,
        block_size: s.block_size,
    };
    let mut end = s.data_end;
    for &(idx, src) in &misplaced {
        end = mover.block(idx, src, end)?.1;
    }
    Ok(Some(format!(
        "moved {} block(s) that lay before the end of the metadata to the end of the file",
        misplaced.len()
    )))
}

/// Bytes the end footer takes where it was found.
fn footer_len(source: FooterSource) -> u64 {
    match source {
        FooterSource::EndShort => FOOTER_SIZE as u64 - 1,
        _ => FOOTER_SIZE as u64,
    }
}

/// No footer opens, but the dynamic header at 512 does: write a rebuilt
/// footer copy at offset 0, so that [`Metadata`] takes it and the rest of
/// `repair` rewrites the end footer where the layout puts it. The old
/// first sector is put back if the file still does not open, so a failed
/// attempt changes nothing. `None` when there is no intact header.
fn rebuild_footer(file: &dyn Backing) -> Result<Option<(String, Metadata)>, ImageError> {
    let len = file.len().map_err(io("stat", 0))?;
    if len < (FOOTER_SIZE + HEADER_SIZE) as u64 {
        return Ok(None);
    }
    let mut hb = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut hb, FOOTER_SIZE as u64)
        .map_err(io("read dynamic header", FOOTER_SIZE as u64))?;
    let Ok(header) = Header::parse(&hb) else {
        return Ok(None);
    };
    let mut first = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut first, 0)
        .map_err(io("read footer copy", 0))?;
    let mut last = [0u8; FOOTER_SIZE];
    let last_off = len - FOOTER_SIZE as u64;
    file.read_exact_at(&mut last, last_off)
        .map_err(io("read footer", last_off))?;
    let damaged = [
        (&last, "the damaged footer at the end"),
        (&first, "the damaged footer copy at offset 0"),
    ]
    .into_iter()
    .find_map(|(b, what)| {
        Footer::from_damaged(b)
            .filter(|f| f.disk_type.is_sparse() && f.data_offset() == FOOTER_SIZE as u64)
            .map(|f| (f, what))
    });
    let (footer, action) = match damaged {
        Some((f, what)) => (f, format!("rebuilt the footer from {what}")),
        None => {
            let size = u64::from(header.max_table_entries()) * u64::from(header.block_size());
            if size == 0 || size > MAX_VIRTUAL_SIZE {
                return Ok(None);
            }
            // A null parent UUID with locators is a child of a raw parent.
            let names_parent = header.locators.iter().any(|l| l.is_used());
            let ty = if header.parent_uuid() == [0; 16] && !names_parent {
                DiskType::Dynamic
            } else {
                DiskType::Differencing
            };
            (
                Footer::new(ty, size, new_uuid()?, vhd_now()),
                format!(
                    "rebuilt the footer from the dynamic header: a {} disk of {size} bytes \
                     (BAT entries x block size) with a new UUID; re-point its children \
                     with `tap-ctl vhd set-parent`",
                    ty.as_str()
                ),
            )
        }
    };
    file.write_all_at(&footer.to_bytes(), 0)
        .map_err(io("write footer copy", 0))?;
    match Metadata::read_with(file, false) {
        Ok(meta) => Ok(Some((action, meta))),
        Err(_) => {
            file.write_all_at(&first, 0)
                .map_err(io("restore footer copy", 0))?;
            Ok(None)
        }
    }
}
