//! Creating images: fixed, dynamic, and differencing children of a parent.
//!
//! Layout of the sparse kinds (as blktap lays them out): footer copy at 0,
//! dynamic header at 512, BAT at 1536, then the batmap header and map, then
//! (differencing) the parent locators, then blocks as they are written, and
//! the footer at the end. Creator `tap\0` makes qemu use `current_size`,
//! so qemu reports exactly the size asked for.

use super::bat;
use super::batmap::{self, BatmapHeader};
use super::footer::{new_uuid, vhd_now, DiskType, Footer, FOOTER_SIZE};
use super::header::{Header, HEADER_SIZE, LOCATOR_SLOTS};
use super::locator::{self, LocatorCode, LocatorEntry};
use super::{DEFAULT_BLOCK_SIZE, MAX_BAT_ENTRIES, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE};
use crate::{Backing, ImageError};

/// Smallest block size `create` accepts (opening accepts 512 like qemu).
pub const MIN_CREATE_BLOCK_SIZE: u32 = 4096;

/// The parent a differencing image records.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    pub uuid: [u8; 16],
    /// Parent modification time, seconds since 2000.
    pub timestamp: u32,
    /// Unicode name (blktap stores the parent's file name).
    pub name: String,
    /// Locators to write, in order: (code, `/`-separated path).
    pub locators: Vec<(LocatorCode, String)>,
}

/// What to create.
#[derive(Debug, Clone)]
pub enum CreateKind {
    Fixed,
    Dynamic { block_size: u32 },
    Differencing { block_size: u32, parent: ParentSpec },
}

impl CreateKind {
    pub fn dynamic() -> Self {
        CreateKind::Dynamic {
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

fn io(op: &'static str, off: u64) -> impl FnOnce(std::io::Error) -> ImageError {
    ImageError::io(op, off)
}

/// Check a size for a new image: whole sectors, above zero, at most
/// [`MAX_VIRTUAL_SIZE`].
pub fn validate_size(size: u64) -> Result<(), ImageError> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VIRTUAL_SIZE {
        return Err(ImageError::InvalidArgument(format!(
            "size {size} must be a positive multiple of 512 of at most {MAX_VIRTUAL_SIZE} bytes"
        )));
    }
    Ok(())
}

pub fn validate_block_size(bs: u32) -> Result<(), ImageError> {
    if !bs.is_power_of_two() || !(MIN_CREATE_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(ImageError::InvalidArgument(format!(
            "block size {bs} must be a power of two between {MIN_CREATE_BLOCK_SIZE} and \
             {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Check everything `create` would refuse, before it touches the file.
fn validate(size: u64, kind: &CreateKind) -> Result<(), ImageError> {
    validate_size(size)?;
    let (block_size, parent) = match kind {
        CreateKind::Fixed => return Ok(()),
        CreateKind::Dynamic { block_size } => (*block_size, None),
        CreateKind::Differencing { block_size, parent } => (*block_size, Some(parent)),
    };
    validate_block_size(block_size)?;
    let entries = size.div_ceil(u64::from(block_size));
    if entries > MAX_BAT_ENTRIES {
        return Err(ImageError::InvalidArgument(format!(
            "{size} bytes in {block_size}-byte blocks needs {entries} blocks, more than \
             {MAX_BAT_ENTRIES}; use a larger block size"
        )));
    }
    if let Some(p) = parent {
        if p.locators.len() > LOCATOR_SLOTS {
            return Err(ImageError::InvalidArgument(
                "too many parent locators".into(),
            ));
        }
        for (code, path) in &p.locators {
            locator::encode(*code, path)?;
        }
    }
    Ok(())
}

/// Write a new image of `size` bytes into `file` (which is truncated
/// first, once the arguments are known to be good: a bad size or block
/// size leaves the file as it was). Returns its footer.
pub fn create(file: &dyn Backing, size: u64, kind: &CreateKind) -> Result<Footer, ImageError> {
    validate(size, kind)?;
    let uuid = new_uuid()?;
    let now = vhd_now();
    file.set_len(0).map_err(io("truncate", 0))?;
    match kind {
        CreateKind::Fixed => {
            let footer = Footer::new(DiskType::Fixed, size, uuid, now);
            file.set_len(size).map_err(io("truncate", size))?;
            file.write_all_at(&footer.to_bytes(), size)
                .map_err(io("write footer", size))?;
            file.sync_data().map_err(io("fsync", 0))?;
            Ok(footer)
        }
        CreateKind::Dynamic { block_size } => {
            create_sparse(file, size, *block_size, None, uuid, now)
        }
        CreateKind::Differencing { block_size, parent } => {
            create_sparse(file, size, *block_size, Some(parent), uuid, now)
        }
    }
}

fn create_sparse(
    file: &dyn Backing,
    size: u64,
    block_size: u32,
    parent: Option<&ParentSpec>,
    uuid: [u8; 16],
    now: u32,
) -> Result<Footer, ImageError> {
    // Checked by `validate`: at most MAX_BAT_ENTRIES, which fits a u32.
    let entries = size.div_ceil(u64::from(block_size)) as u32;
    let disk_type = if parent.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let footer = Footer::new(disk_type, size, uuid, now);
    let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let mut header = Header::new(table_offset, entries, block_size);

    // BAT, all unused.
    let table = bat::encode(&[], entries);
    file.write_all_at(&table, table_offset)
        .map_err(io("write BAT", table_offset))?;
    let mut off = table_offset + table.len() as u64;

    // Batmap: header sector, then an all-clear map.
    let map_sectors = batmap::map_sectors(entries, size)?;
    let map = vec![0u8; map_sectors as usize * 512];
    let sum_len = batmap::checksum_len(size) as usize;
    let bm_header = BatmapHeader::new(
        off + batmap::HEADER_BYTES as u64,
        map_sectors,
        batmap::CURRENT_VERSION,
        batmap::checksum(&map[..sum_len], batmap::CURRENT_VERSION),
    );
    file.write_all_at(&bm_header.to_bytes(), off)
        .map_err(io("write batmap", off))?;
    file.write_all_at(&map, bm_header.offset)
        .map_err(io("write batmap", bm_header.offset))?;
    off = bm_header.offset + map.len() as u64;

    // Parent locators and name.
    if let Some(p) = parent {
        header.set_parent(p.uuid, p.timestamp, &p.name);
        for (slot, (code, path)) in p.locators.iter().enumerate() {
            let data = locator::encode(*code, path)?;
            let space = data.len().div_ceil(512).max(1) * 512;
            let mut padded = data.clone();
            padded.resize(space, 0);
            file.write_all_at(&padded, off)
                .map_err(io("write parent locator", off))?;
            header.locators[slot] = LocatorEntry {
                code: *code,
                data_space: space as u32, // <= MAX_LOCATOR_LEN rounded up
                data_len: data.len() as u32,
                data_offset: off,
            };
            off += space as u64;
        }
    }

    file.write_all_at(&header.to_bytes(), FOOTER_SIZE as u64)
        .map_err(io("write header", FOOTER_SIZE as u64))?;
    let fb = footer.to_bytes();
    file.write_all_at(&fb, 0).map_err(io("write footer", 0))?;
    file.write_all_at(&fb, off)
        .map_err(io("write footer", off))?;
    file.sync_data().map_err(io("fsync", 0))?;
    Ok(footer)
}
