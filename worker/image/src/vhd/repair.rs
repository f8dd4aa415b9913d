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
//! BAT entries pointing outside the file or into metadata are reported,
//! not "fixed": clearing them would lose data silently.

use super::bat::UNUSED;
use super::batmap::{self, BatmapHeader};
use super::bitmap;
use super::check::{check, Problem};
use super::footer::{CREATOR_VERSION_OPTIONAL_BATMAP, FOOTER_SIZE};
use super::layout::{BatmapState, FooterSource, Metadata};
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
    let meta = Metadata::read_with(file, false)?;
    let mut report = RepairReport::default();
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
                for (b, &e) in s.bat.iter().enumerate().take(sum_len * 8) {
                    if e == UNUSED {
                        continue;
                    }
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
                s.data_end
            }
            None => {
                let len = match meta.footer_source {
                    FooterSource::EndShort => FOOTER_SIZE as u64 - 1,
                    _ => FOOTER_SIZE as u64,
                };
                meta.file_len - len
            }
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
