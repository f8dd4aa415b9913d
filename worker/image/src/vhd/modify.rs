//! `tap-ctl vhd set-parent`: point a differencing image at another parent
//! (after the parent was moved, or replaced by an equivalent copy).
//!
//! The dynamic header that names the parent spans two sectors (checksum in
//! the first, locator table in the second), so rewriting it in place is
//! never atomic: a write torn at a power cut leaves a header whose checksum
//! fails and a child that no longer opens (the crash harness,
//! `worker/image/tests/crash`, found exactly that). Instead each step
//! writes either space nothing refers to or single footer sectors, and
//! flushes:
//! 1. the new locator payloads, then a copy of the new header, go to fresh
//!    space past all data (the end footer first moves past them);
//! 2. both footers point at that copy (copy at offset 0 first, end last);
//! 3. the header in its own place is rewritten: torn or not, nothing reads
//!    it now;
//! 4. both footers point back at it.
//!
//! A cut anywhere leaves the old header or the new one, at worst with
//! footers that differ (which `repair` fixes from the end footer). The
//! header stays where blktap's tools and `repair` expect it; the copy is
//! left after the payloads, where the next block may overwrite it. Old
//! payloads are never overwritten (the live header refers to them until
//! step 2) and their space stays reserved in the new locator table.

use super::create::ParentSpec;
use super::endian::round_up_sector;
use super::footer::{DiskType, FOOTER_SIZE};
use super::header::{HEADER_SIZE, LOCATOR_SLOTS};
use super::layout::{FooterSource, Metadata};
use super::locator::{self, LocatorCode, LocatorEntry};
use crate::{Backing, ImageError};

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

fn overflow() -> ImageError {
    ImageError::InvalidArgument("the new parent locators would not fit a file".into())
}

pub fn set_parent(file: &dyn Backing, parent: &ParentSpec) -> Result<(), ImageError> {
    let meta = Metadata::read(file)?;
    let Some(s) = meta
        .sparse
        .as_ref()
        .filter(|_| meta.footer.disk_type == DiskType::Differencing)
    else {
        return Err(ImageError::InvalidArgument(
            "only a differencing image has a parent".into(),
        ));
    };
    if parent.locators.len() > LOCATOR_SLOTS {
        return Err(ImageError::InvalidArgument(
            "too many parent locators".into(),
        ));
    }
    let mut header = s.header.clone();
    header.set_parent(parent.uuid, parent.timestamp, &parent.name);
    let old = header.locators;
    let mut new = [LocatorEntry::default(); LOCATOR_SLOTS];
    let mut payloads = Vec::with_capacity(parent.locators.len());
    let mut at = s.data_end;
    for (slot, (code, path)) in parent.locators.iter().enumerate() {
        let data = locator::encode(*code, path)?;
        let space = (data.len().div_ceil(512).max(1) * 512) as u64;
        new[slot] = LocatorEntry {
            code: *code,
            data_space: u32::try_from(space).map_err(|_| overflow())?,
            data_len: u32::try_from(data.len()).map_err(|_| overflow())?,
            data_offset: at,
        };
        let mut padded = data;
        padded.resize(space as usize, 0);
        payloads.push((at, padded));
        at = at.checked_add(space).ok_or_else(overflow)?;
    }
    // Keep the old slots' space reserved (as `None` it would be lost to
    // the layout, and a block might later be placed over a stale path).
    for l in old.iter().filter(|l| l.is_used()) {
        if let Some(slot) = new.iter().position(|n| !n.is_used()) {
            new[slot] = LocatorEntry {
                code: LocatorCode::Mac,
                data_len: 0,
                ..*l
            };
        }
    }
    header.locators = new;
    let header_bytes = header.to_bytes();
    let copy_at = at;
    let meta_end = copy_at
        .checked_add(HEADER_SIZE as u64)
        .ok_or_else(overflow)?;

    // 0. The end footer moves past the new space (never backwards: the
    // file only grows).
    let footer_len = match meta.footer_source {
        FooterSource::EndShort => FOOTER_SIZE as u64 - 1,
        _ => FOOTER_SIZE as u64,
    };
    let held = if meta.end_footer_ok {
        meta.file_len - footer_len
    } else {
        meta.file_len
    };
    let end = meta_end.max(round_up_sector(held).ok_or_else(overflow)?);
    let old_footer = meta.footer.to_bytes();
    let footer_in_place =
        meta.end_footer_ok && meta.footer_source == FooterSource::End && end == held;
    if !footer_in_place {
        file.write_all_at(&old_footer, end)
            .map_err(io("write footer", end))?;
        file.sync_data().map_err(io("fsync", end))?;
    }

    // 1. Payloads and the header copy, in space nothing refers to.
    for (off, data) in &payloads {
        file.write_all_at(data, *off)
            .map_err(io("write parent locator", *off))?;
    }
    file.write_all_at(&header_bytes, copy_at)
        .map_err(io("write header copy", copy_at))?;
    file.sync_data().map_err(io("fsync", copy_at))?;

    // 2. The footers switch to the copy; 3. the header proper is
    // rewritten; 4. the footers switch back.
    let hoff = meta.footer.data_offset();
    let mut to_copy = meta.footer.clone();
    to_copy.set_data_offset(copy_at);
    write_footers(file, &to_copy.to_bytes(), end)?;
    file.write_all_at(&header_bytes, hoff)
        .map_err(io("write header", hoff))?;
    file.sync_data().map_err(io("fsync", hoff))?;
    write_footers(file, &old_footer, end)
}

/// Both footers, the copy at offset 0 first and the end (the one trusted)
/// last, then a flush: each is one sector, so a cut leaves each old or new.
fn write_footers(file: &dyn Backing, footer: &[u8], end: u64) -> Result<(), ImageError> {
    file.write_all_at(footer, 0)
        .map_err(io("write footer copy", 0))?;
    file.write_all_at(footer, end)
        .map_err(io("write footer", end))?;
    file.sync_data().map_err(io("fsync", end))
}
