//! `tap-ctl vhd resize`: grow a disk. Shrinking is refused (it would drop
//! data the guest may still use).
//!
//! Fixed: the footer moves to the new end (the old one is zeroed, it is
//! disk data now). Dynamic/differencing: if the BAT has room (blktap
//! preallocates it) only the footers change; otherwise the BAT grows in
//! place and blocks in its way move to the end (see [`grow`]), so that
//! metadata stays first as blktap's tools require.

use super::bat::{self, UNUSED};
use super::batmap::{self, BatmapHeader};
use super::create::validate_size;
use super::footer::{Footer, CREATOR_TAP, CREATOR_VERSION_OPTIONAL_BATMAP, FOOTER_SIZE};
use super::layout::{BatmapState, FooterSource, Metadata};
use super::MAX_BAT_ENTRIES;
use crate::{Backing, ImageError};

mod grow;

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

/// The footer for the new size. Creators whose size comes from the CHS
/// geometry become `tap\0` (batmap optional), because the geometry cannot
/// express most sizes exactly.
fn resized_footer(old: &Footer, size: u64) -> Footer {
    let mut f = old.clone();
    f.set_current_size(size);
    if !old.size_from_current_size() {
        f.set_creator_app(CREATOR_TAP);
        f.set_creator_version(CREATOR_VERSION_OPTIONAL_BATMAP);
    }
    f
}

/// Grow the image in `file` to `new_size` bytes.
pub fn resize(file: &dyn Backing, new_size: u64) -> Result<(), ImageError> {
    validate_size(new_size)?;
    let meta = Metadata::read(file)?;
    if new_size < meta.virtual_size {
        return Err(ImageError::InvalidArgument(format!(
            "shrinking from {} to {new_size} bytes would discard data; only growing is \
             supported: give a size of at least {} MiB",
            meta.virtual_size,
            meta.virtual_size.div_ceil(1 << 20)
        )));
    }
    if new_size == meta.virtual_size {
        return Ok(());
    }
    let footer = resized_footer(&meta.footer, new_size);
    let fb = footer.to_bytes();
    let Some(s) = &meta.sparse else {
        // Fixed: new footer first, then zero the old one (now disk data).
        // The footer's own write extends the file: a length set apart
        // could reach the disk without it and leave no footer at the end.
        // Between the two syncs the old footer reads as the first sector
        // of the new space (documented; the crash harness allows it there).
        let old = meta.file_len
            - match meta.footer_source {
                FooterSource::EndShort => FOOTER_SIZE as u64 - 1,
                _ => FOOTER_SIZE as u64,
            };
        file.write_all_at(&fb, new_size)
            .map_err(io("write footer", new_size))?;
        file.sync_data().map_err(io("fsync", 0))?;
        let zero = (new_size - old).min(FOOTER_SIZE as u64) as usize;
        file.write_all_at(&vec![0u8; zero], old)
            .map_err(io("write", old))?;
        return file.sync_data().map_err(io("fsync", 0));
    };
    let bs = u64::from(s.block_size);
    let needed = new_size.div_ceil(bs);
    if needed > MAX_BAT_ENTRIES {
        return Err(ImageError::InvalidArgument(format!(
            "{new_size} bytes needs {needed} blocks of {bs} bytes, more than {MAX_BAT_ENTRIES}"
        )));
    }
    let needed = needed as u32;
    let max = s.header.max_table_entries();
    let table_offset = s.header.table_offset();
    let sum_len = batmap::checksum_len(new_size);
    let batmap_fits = match &s.batmap {
        BatmapState::Valid { header, .. } => header.map_bytes() >= sum_len,
        _ => true,
    };
    // Where the end footer goes.
    let mut end = s.data_end;
    if needed <= max && batmap_fits {
        // Entries between the old and the new size may hold stale blocks
        // (from before a shrink by another tool): unmap them.
        let old_n = s.bat.len() as u64;
        let table = bat::read(file, table_offset, max)?;
        for b in old_n..u64::from(needed) {
            if table[b as usize] != UNUSED {
                let off = table_offset + b * 4;
                file.write_all_at(&UNUSED.to_be_bytes(), off)
                    .map_err(io("write BAT", off))?;
            }
        }
        if let BatmapState::Valid { header, map } = &s.batmap {
            let h = BatmapHeader {
                checksum: batmap::checksum(&map[..sum_len as usize], header.version),
                ..*header
            };
            file.write_all_at(&h.to_bytes(), s.batmap_header_offset)
                .map_err(io("write batmap", s.batmap_header_offset))?;
        }
    } else {
        end = grow::grow(file, &meta, s, new_size, needed)?;
    }
    file.write_all_at(&fb, 0).map_err(io("write footer", 0))?;
    file.write_all_at(&fb, end)
        .map_err(io("write footer", end))?;
    file.set_len(end + FOOTER_SIZE as u64)
        .map_err(io("truncate", end))?;
    file.sync_data().map_err(io("fsync", 0))
}
