//! A dynamic or differencing VHD's own structures: the dynamic header, the
//! BAT, the batmap and the parent locators, each bounds-checked against the
//! file and against the others (regions may not overlap).

use super::{read_at, BatmapState, Finding, Sparse};
use crate::vhd::bat::{self, UNUSED};
use crate::vhd::batmap::{self, BatmapHeader};
use crate::vhd::bitmap::bitmap_bytes;
use crate::vhd::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::vhd::header::{Header, HEADER_SIZE};
use crate::vhd::locator::MAX_LOCATOR_LEN;
use crate::vhd::MAX_BAT_ENTRIES;
use crate::{Backing, ImageError};

/// A byte range of the file with a name, for overlap checks.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    what: &'static str,
}

impl Region {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn read_sparse(
    file: &dyn Backing,
    footer: &Footer,
    virtual_size: u64,
    file_len: u64,
    limit: u64,
    strict: bool,
    findings: &mut Vec<Finding>,
) -> Result<Sparse, ImageError> {
    let differencing = footer.disk_type == DiskType::Differencing;
    // --- dynamic header
    let data_offset = footer.data_offset();
    if data_offset < FOOTER_SIZE as u64
        || !data_offset.is_multiple_of(512)
        || data_offset
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > limit)
    {
        return Err(ImageError::corrupt(
            "footer.data_offset",
            format!(
                "dynamic header at byte {data_offset} is not a sector-aligned offset \
                 inside a {file_len}-byte file past the footer copy"
            ),
        ));
    }
    let mut hb = [0u8; HEADER_SIZE];
    read_at(file, &mut hb, data_offset, "read dynamic header")?;
    let header = Header::parse(&hb)?;
    let block_size = header.block_size();
    let bm_bytes = bitmap_bytes(block_size);

    // --- sizes and the BAT
    let n_blocks = virtual_size.div_ceil(u64::from(block_size));
    if n_blocks > MAX_BAT_ENTRIES {
        return Err(ImageError::corrupt(
            "header.block_size",
            format!(
                "a {virtual_size}-byte disk in {block_size}-byte blocks needs {n_blocks} \
                 blocks, more than the maximum of {MAX_BAT_ENTRIES}"
            ),
        ));
    }
    let max_entries = header.max_table_entries();
    if u64::from(max_entries) > MAX_BAT_ENTRIES {
        return Err(ImageError::corrupt(
            "header.max_table_entries",
            format!("{max_entries} is more than the maximum of {MAX_BAT_ENTRIES}"),
        ));
    }
    if u64::from(max_entries) < n_blocks {
        return Err(ImageError::corrupt(
            "header.max_table_entries",
            format!(
                "{max_entries} entries of {block_size} bytes cover less than the \
                 {virtual_size}-byte disk"
            ),
        ));
    }
    let table_offset = header.table_offset();
    let table_bytes = bat::table_bytes(max_entries);
    if table_offset % 512 != 0 || table_offset < FOOTER_SIZE as u64 || table_offset > limit {
        return Err(ImageError::corrupt(
            "header.table_offset",
            format!(
                "BAT at byte {table_offset} is not a sector-aligned offset inside the \
                 {file_len}-byte file"
            ),
        ));
    }
    let table_end = table_offset
        .checked_add(table_bytes)
        .filter(|&e| e <= limit)
        .ok_or_else(|| {
            ImageError::corrupt(
                "header.max_table_entries",
                format!(
                    "a BAT of {max_entries} entries at byte {table_offset} runs past the end \
                     of the {file_len}-byte file"
                ),
            )
        })?;
    let header_region = Region {
        start: data_offset,
        end: data_offset + HEADER_SIZE as u64,
        what: "the dynamic header",
    };
    let copy_region = Region {
        start: 0,
        end: FOOTER_SIZE as u64,
        what: "the footer copy",
    };
    let bat_region = Region {
        start: table_offset,
        end: table_end,
        what: "the BAT",
    };
    for r in [copy_region, header_region] {
        if r.overlaps(bat_region.start, bat_region.end) {
            return Err(ImageError::corrupt(
                "header.table_offset",
                format!("the BAT at byte {table_offset} overlaps {}", r.what),
            ));
        }
    }
    let mut regions = vec![copy_region, header_region, bat_region];

    // --- parent locators (differencing only)
    if differencing {
        for (i, loc) in header.locators.iter().enumerate() {
            if !loc.is_used() {
                continue;
            }
            let r = check_locator(i, loc, limit, &regions);
            match r {
                Ok(Some(region)) => regions.push(region),
                Ok(None) => {}
                Err(e) if strict => return Err(e),
                Err(e) => findings.push(finding_of(e)),
            }
        }
    }
    let mut metadata_end = regions.iter().map(|r| r.end).max().unwrap_or(0);

    // --- every BAT entry: inside the file, clear of metadata and of other blocks
    // Checked in place and kept (cut to the disk's blocks): a second copy
    // of a large table may not fit in a worker's locked memory.
    let mut bat_entries = bat::read(file, table_offset, max_entries)?;
    let block_total = u64::from(bm_bytes) + u64::from(block_size);
    let mut starts: Vec<(u64, u32)> = Vec::new();
    let mut allocated_beyond_size = 0u32;
    for (i, entry) in bat_entries.iter_mut().enumerate() {
        let idx = i as u32; // i < max_entries <= MAX_BAT_ENTRIES
        let e = *entry;
        if e != UNUSED {
            let start = u64::from(e) * 512;
            let end = start + block_total; // < 2^41 + 2^27: no overflow
            let problem = if end > limit {
                Some(format!(
                    "entry {idx} puts its block at bytes {start}..{end}, past the end \
                     of the {file_len}-byte file"
                ))
            } else {
                regions.iter().find(|r| r.overlaps(start, end)).map(|r| {
                    format!(
                        "entry {idx} puts its block at bytes {start}..{end}, over {}",
                        r.what
                    )
                })
            };
            match problem {
                Some(msg) if strict => return Err(ImageError::corrupt("bat", msg)),
                Some(msg) => {
                    findings.push(Finding {
                        field: "bat",
                        message: msg,
                    });
                    *entry = UNUSED;
                }
                None => starts.push((start, idx)),
            }
        }
        if u64::from(idx) >= n_blocks && *entry != UNUSED {
            allocated_beyond_size += 1;
        }
    }
    bat_entries.truncate(usize::try_from(n_blocks).unwrap_or(usize::MAX));
    starts.sort_unstable();
    for w in starts.windows(2) {
        if w[0].0 + block_total > w[1].0 {
            let msg = format!("blocks {} and {} overlap in the file", w[0].1, w[1].1);
            if strict {
                return Err(ImageError::corrupt("bat", msg));
            }
            findings.push(Finding {
                field: "bat",
                message: msg,
            });
        }
    }
    let blocks_end = starts.last().map(|s| s.0 + block_total).unwrap_or(0);

    // --- batmap
    let batmap_header_offset = table_end;
    let mut encrypted = false;
    let mut keyhash = None;
    let batmap = read_batmap(
        file,
        footer,
        batmap_header_offset,
        limit,
        &regions,
        &starts,
        block_total,
        &mut metadata_end,
        &mut encrypted,
        &mut keyhash,
    )?;
    if let BatmapState::Ignored { reason, .. } = &batmap {
        findings.push(Finding {
            field: "batmap",
            message: reason.clone(),
        });
    }
    let data_end = crate::vhd::endian::round_up_sector(metadata_end.max(blocks_end))
        .ok_or_else(|| ImageError::corrupt("bat", "offsets overflow"))?;
    Ok(Sparse {
        header,
        block_size,
        bitmap_bytes: bm_bytes,
        bat: bat_entries,
        batmap,
        allocated_beyond_size,
        batmap_header_offset,
        metadata_end,
        data_end,
        encrypted,
        keyhash,
    })
}

fn finding_of(e: ImageError) -> Finding {
    match e {
        ImageError::Corrupt { field, reason } => Finding {
            field,
            message: reason,
        },
        other => Finding {
            field: "image",
            message: other.to_string(),
        },
    }
}

fn check_locator(
    i: usize,
    loc: &crate::vhd::locator::LocatorEntry,
    limit: u64,
    regions: &[Region],
) -> Result<Option<Region>, ImageError> {
    let space = loc.space_bytes().ok_or_else(|| {
        ImageError::corrupt(
            "header.parent_locator.data_space",
            format!(
                "slot {i}: data space {} is neither a count of sectors nor a whole \
                 number of 512-byte sectors counted in bytes",
                loc.data_space
            ),
        )
    })?;
    if loc.data_len > MAX_LOCATOR_LEN || u64::from(loc.data_len) > space {
        return Err(ImageError::corrupt(
            "header.parent_locator.data_len",
            format!(
                "slot {i}: {} bytes in {space} bytes of space (at most {MAX_LOCATOR_LEN})",
                loc.data_len
            ),
        ));
    }
    if space == 0 {
        return Ok(None);
    }
    let start = loc.data_offset;
    let end = start
        .checked_add(space)
        .filter(|&e| e <= limit && start.is_multiple_of(512))
        .ok_or_else(|| {
            ImageError::corrupt(
                "header.parent_locator.data_offset",
                format!("slot {i}: byte {start} is not a sector boundary inside the file"),
            )
        })?;
    if let Some(r) = regions.iter().find(|r| r.overlaps(start, end)) {
        return Err(ImageError::corrupt(
            "header.parent_locator.data_offset",
            format!("slot {i}: locator data overlaps {}", r.what),
        ));
    }
    Ok(Some(Region {
        start,
        end,
        what: "a parent locator",
    }))
}

#[allow(clippy::too_many_arguments)]
fn read_batmap(
    file: &dyn Backing,
    footer: &Footer,
    hdr_off: u64,
    limit: u64,
    regions: &[Region],
    blocks: &[(u64, u32)],
    block_total: u64,
    metadata_end: &mut u64,
    encrypted: &mut bool,
    keyhash: &mut Option<crate::vhd::crypt::Keyhash>,
) -> Result<BatmapState, ImageError> {
    let expected = footer.batmap_expected();
    if expected == Some(false) {
        return Ok(BatmapState::Absent);
    }
    let ignore = |reason: String| {
        Ok(if expected == Some(true) {
            BatmapState::Ignored {
                reason,
                stale: None,
            }
        } else {
            BatmapState::Absent
        })
    };
    let hdr_end = hdr_off + batmap::HEADER_BYTES as u64;
    if hdr_end > limit {
        return ignore("the batmap header would lie past the end of the file".into());
    }
    let overlapping_block = |start: u64, end: u64| {
        // `blocks` is sorted by start: find the first block ending after `start`.
        let i = blocks.partition_point(|b| b.0 + block_total <= start);
        blocks.get(i).filter(|b| b.0 < end).map(|b| b.1)
    };
    if let Some(b) = overlapping_block(hdr_off, hdr_end) {
        return ignore(format!(
            "the batmap header is overwritten by block {b} (written by a tool that does \
             not know batmaps, such as qemu); it is ignored"
        ));
    }
    let mut hb = [0u8; batmap::HEADER_BYTES];
    read_at(file, &mut hb, hdr_off, "read batmap header")?;
    let header = match BatmapHeader::parse(&hb) {
        Ok(h) => h,
        Err(why) => return ignore(format!("batmap header: {why}")),
    };
    *encrypted = header.keyhash_set();
    *keyhash = crate::vhd::crypt::Keyhash::from_header(&hb);
    *metadata_end = (*metadata_end).max(hdr_end);
    let map_bytes = header.map_bytes();
    let sum_len = batmap::checksum_len(footer.current_size());
    if map_bytes > batmap::MAX_BATMAP_BYTES || map_bytes < sum_len {
        return ignore(format!(
            "batmap of {map_bytes} bytes, expected at least {sum_len} and at most {}",
            batmap::MAX_BATMAP_BYTES
        ));
    }
    let map_end = match header
        .offset
        .checked_add(map_bytes)
        .filter(|&e| e <= limit && header.offset % 512 == 0)
    {
        Some(e) => e,
        None => return ignore("batmap map lies outside the file".into()),
    };
    if let Some(r) = regions.iter().find(|r| r.overlaps(header.offset, map_end)) {
        return ignore(format!("batmap map overlaps {}", r.what));
    }
    if hdr_off < map_end && header.offset < hdr_end {
        return ignore("batmap map overlaps its header".into());
    }
    *metadata_end = (*metadata_end).max(map_end);
    if let Some(b) = overlapping_block(header.offset, map_end) {
        return ignore(format!(
            "the batmap is overwritten by block {b} (written by a tool that does not \
             know batmaps, such as qemu); it is ignored"
        ));
    }
    let mut map = vec![0u8; map_bytes as usize]; // <= MAX_BATMAP_BYTES
    read_at(file, &mut map, header.offset, "read batmap")?;
    let sum = batmap::checksum(&map[..sum_len as usize], header.version);
    if sum != header.checksum {
        return Ok(BatmapState::Ignored {
            reason: format!(
                "batmap checksum {:#010x} does not match its contents ({sum:#010x})",
                header.checksum
            ),
            stale: Some(header),
        });
    }
    Ok(BatmapState::Valid { header, map })
}
