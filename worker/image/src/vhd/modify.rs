//! `tap-ctl vhd set-parent`: point a differencing image at another parent
//! (after the parent was moved, or replaced by an equivalent copy).
//!
//! New locator payloads go into the slots' existing space when they fit,
//! otherwise after the end of the data; the header, which refers to them,
//! is written last.

use super::create::ParentSpec;
use super::footer::{DiskType, FOOTER_SIZE};
use super::header::LOCATOR_SLOTS;
use super::layout::Metadata;
use super::locator::{self, LocatorCode, LocatorEntry};
use crate::{Backing, ImageError};

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
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
    let mut used_old = [false; LOCATOR_SLOTS];
    let mut new = [LocatorEntry::default(); LOCATOR_SLOTS];
    let mut end = s.data_end;
    let mut appended = false;
    for (slot, (code, path)) in parent.locators.iter().enumerate() {
        let data = locator::encode(*code, path)?;
        let need = (data.len().div_ceil(512).max(1) * 512) as u64;
        // Reuse an old slot's space that is big enough.
        let reuse = old.iter().enumerate().find(|(i, l)| {
            !used_old[*i] && l.is_used() && l.space_bytes().is_some_and(|sp| sp >= need)
        });
        let (offset, space) = match reuse {
            Some((i, l)) => {
                used_old[i] = true;
                (l.data_offset, l.space_bytes().unwrap_or(need))
            }
            None => {
                let o = end;
                end += need;
                appended = true;
                (o, need)
            }
        };
        let mut padded = data.clone();
        padded.resize(space as usize, 0);
        file.write_all_at(&padded, offset)
            .map_err(io("write parent locator", offset))?;
        new[slot] = LocatorEntry {
            code: *code,
            data_space: u32::try_from(space).unwrap_or(u32::MAX),
            data_len: data.len() as u32,
            data_offset: offset,
        };
    }
    // Keep the old slots' space reserved (as `None` they would be lost to
    // the layout, and a block might later be placed over a stale path).
    for (i, l) in old.iter().enumerate() {
        if l.is_used() && !used_old[i] {
            if let Some(slot) = new.iter().position(|n| !n.is_used()) {
                new[slot] = LocatorEntry {
                    code: LocatorCode::Mac,
                    data_len: 0,
                    ..*l
                };
            }
        }
    }
    header.locators = new;
    if appended {
        file.write_all_at(&meta.footer.to_bytes(), end)
            .map_err(io("write footer", end))?;
        file.set_len(end + FOOTER_SIZE as u64)
            .map_err(io("truncate", end))?;
    }
    file.sync_data().map_err(io("fsync", 0))?;
    let hoff = meta.footer.data_offset();
    file.write_all_at(&header.to_bytes(), hoff)
        .map_err(io("write header", hoff))?;
    file.sync_data().map_err(io("fsync", 0))
}
