//! `tap-ctl vhd set-parent`: point a differencing image at another parent
//! (after the parent was moved, or replaced by an equivalent copy).
//!
//! The dynamic header that names the parent spans two sectors (checksum in
//! the first, locator table in the second), so rewriting it in place is
//! never atomic: a write torn at a power cut leaves a header whose checksum
//! fails and a child that no longer opens (the crash harness,
//! `worker/image/tests/crash`, found exactly that). Instead each step
//! writes either space no footer-referenced header refers to, or single
//! footer sectors, and flushes:
//! 1. the new locator payloads, then a copy of the new header naming them,
//!    go to fresh space past all data (the end footer first moves past);
//! 2. both footers point at that copy (copy at offset 0 first, end last);
//! 3. the header in its own place is rewritten, its payloads in the old
//!    slots' space where they fit (blktap's tools want locators before the
//!    first block): torn or not, nothing reads any of it now;
//! 4. both footers point back at it;
//! 5. the end footer moves back over what the copy used, and the file is
//!    cut there.
//!
//! A cut anywhere leaves the old header or the new one, at worst with
//! footers that differ or no footer at the end (which `repair` fixes), and
//! while the copy is live `check` reports blocks before the metadata end.
//! Old payloads are never overwritten while a live header names them, and
//! their space stays reserved in the new locator table.

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

/// One new locator: its table entry (offset filled in per placement) and
/// its payload padded to whole sectors.
struct Payload {
    code: LocatorCode,
    data: Vec<u8>,
    space: u64,
}

impl Payload {
    fn entry(&self, data_offset: u64, space: u64) -> Result<LocatorEntry, ImageError> {
        Ok(LocatorEntry {
            code: self.code,
            data_space: u32::try_from(space).map_err(|_| overflow())?,
            data_len: u32::try_from(self.data.len()).map_err(|_| overflow())?,
            data_offset,
        })
    }

    fn padded(&self, space: u64) -> Vec<u8> {
        let mut p = self.data.clone();
        p.resize(space as usize, 0);
        p
    }
}

/// `new` plus the old slots' space that `new` does not reuse, reserved.
fn with_reserved(
    mut new: [LocatorEntry; LOCATOR_SLOTS],
    old: &[LocatorEntry; LOCATOR_SLOTS],
    reused: &[bool; LOCATOR_SLOTS],
) -> [LocatorEntry; LOCATOR_SLOTS] {
    // As `None` the space would be lost to the layout, and a block might
    // later be placed over a stale path.
    for (l, _) in old.iter().zip(reused).filter(|(l, &r)| l.is_used() && !r) {
        if let Some(slot) = new.iter().position(|n| !n.is_used()) {
            new[slot] = LocatorEntry {
                code: LocatorCode::Mac,
                data_len: 0,
                ..*l
            };
        }
    }
    new
}

pub fn set_parent(file: &dyn Backing, parent: &ParentSpec) -> Result<(), ImageError> {
    rewrite(file, parent, false)
}

/// Make a differencing image a dynamic one that names no parent (the
/// online stream's last step, once every sector the parent held is in
/// the child). The same steps as [`set_parent`], with a header naming
/// nothing and footers that say `dynamic` from the switch on: each footer
/// write changes the header it points at and the type together, so every
/// cut leaves the old differencing child or the new dynamic image. The
/// old locators' space is not reserved: no header names it any more.
pub fn detach_parent(file: &dyn Backing) -> Result<(), ImageError> {
    let none = ParentSpec {
        uuid: [0; 16],
        timestamp: 0,
        name: String::new(),
        locators: Vec::new(),
    };
    rewrite(file, &none, true)
}

fn rewrite(file: &dyn Backing, parent: &ParentSpec, detach: bool) -> Result<(), ImageError> {
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
    let payloads = parent
        .locators
        .iter()
        .map(|(code, path)| {
            let data = locator::encode(*code, path)?;
            let space = (data.len().div_ceil(512).max(1) * 512) as u64;
            Ok(Payload {
                code: *code,
                data,
                space,
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    let mut named = s.header.clone();
    named.set_parent(parent.uuid, parent.timestamp, &parent.name);
    let old = named.locators;

    // Where the copy's payloads go (fresh), and the final ones (an old
    // slot's space when big enough, else the fresh copy).
    let mut fresh = [LocatorEntry::default(); LOCATOR_SLOTS];
    let mut last = [LocatorEntry::default(); LOCATOR_SLOTS];
    let mut reused = [false; LOCATOR_SLOTS];
    let mut in_old = Vec::new();
    let mut at = s.data_end;
    for (slot, p) in payloads.iter().enumerate() {
        fresh[slot] = p.entry(at, p.space)?;
        last[slot] = fresh[slot];
        let reuse = old.iter().enumerate().find(|(i, l)| {
            !reused[*i] && l.is_used() && l.space_bytes().is_some_and(|sp| sp >= p.space)
        });
        if let Some((i, l)) = reuse {
            reused[i] = true;
            let space = l.space_bytes().unwrap_or(p.space);
            last[slot] = p.entry(l.data_offset, space)?;
            in_old.push((l.data_offset, p.padded(space)));
        }
        at = at.checked_add(p.space).ok_or_else(overflow)?;
    }
    let mut copy = named.clone();
    let mut header = named;
    if detach {
        copy.locators = fresh;
        header.locators = last;
    } else {
        copy.locators = with_reserved(fresh, &old, &[false; LOCATOR_SLOTS]);
        header.locators = with_reserved(last, &old, &reused);
    }
    let copy_at = at;
    let meta_end = copy_at
        .checked_add(HEADER_SIZE as u64)
        .ok_or_else(overflow)?;

    // 0. The end footer moves past the new space (never backwards: the
    // file only grows until step 5).
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

    // 1. Fresh payloads and the header copy, in space nothing refers to.
    for (p, e) in payloads.iter().zip(&fresh) {
        file.write_all_at(&p.padded(p.space), e.data_offset)
            .map_err(io("write parent locator", e.data_offset))?;
    }
    file.write_all_at(&copy.to_bytes(), copy_at)
        .map_err(io("write header copy", copy_at))?;
    file.sync_data().map_err(io("fsync", copy_at))?;

    // 2. The footers switch to the copy (and, detaching, to `dynamic`).
    let hoff = meta.footer.data_offset();
    let mut new_footer = meta.footer.clone();
    if detach {
        new_footer.disk_type = DiskType::Dynamic;
    }
    let final_footer = new_footer.to_bytes();
    let mut to_copy = new_footer;
    to_copy.set_data_offset(copy_at);
    write_footers(file, &to_copy.to_bytes(), end)?;

    // 3. The header proper and the payloads in old slots, unreferenced now.
    for (off, data) in &in_old {
        file.write_all_at(data, *off)
            .map_err(io("write parent locator", *off))?;
    }
    file.write_all_at(&header.to_bytes(), hoff)
        .map_err(io("write header", hoff))?;
    file.sync_data().map_err(io("fsync", hoff))?;

    // 4. The footers switch back.
    write_footers(file, &final_footer, end)?;

    // 5. Give back the space of the copy and of payloads now in old slots.
    let after = Metadata::read(file)?;
    let data_end = after.sparse.as_ref().map_or(end, |s| s.data_end);
    if data_end < end {
        file.write_all_at(&final_footer, data_end)
            .map_err(io("write footer", data_end))?;
        file.set_len(data_end + FOOTER_SIZE as u64)
            .map_err(io("truncate", data_end))?;
        file.sync_data().map_err(io("fsync", data_end))?;
    }
    Ok(())
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
