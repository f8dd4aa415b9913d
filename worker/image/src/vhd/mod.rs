//! The VHD engine: fixed, dynamic and differencing images, chains of any
//! depth up to [`MAX_CHAIN_DEPTH`], blktap's batmap, and the offline
//! operations behind `tap-ctl vhd` (create, check, repair, coalesce,
//! resize, set-parent, convert).
//!
//! One concern per module: [`footer`], [`header`], [`bat`], [`bitmap`],
//! [`batmap`], [`locator`] and [`geometry`] parse and write the on-disk
//! structures; [`layout`] validates a whole file; [`layer`] serves one file;
//! [`image`] serves a chain as an [`crate::Image`]; [`chain`] opens
//! one through a [`crate::ParentOpener`]. Opening files by path is the
//! offline tool's business (`tap-ctl`'s `files` module), never the engine's.
//!
//! Which footer is trusted: the one at the end of the file (as blktap).
//! For a fixed image it is the only one (the first sector is guest data,
//! whatever it looks like). For dynamic and differencing images the copy at
//! offset 0 is used when the end holds no valid footer (a crash between
//! writing a new block and its footer) or one with another UUID (then the
//! end is guest data that happens to look like a footer).

pub mod bat;
pub mod batmap;
pub mod bitmap;
pub mod chain;
pub mod check;
pub mod coalesce;
pub mod convert;
pub mod create;
pub mod crypt;
pub mod direct;
mod endian;
pub mod footer;
pub mod geometry;
pub mod header;
pub mod image;
pub mod info;
pub mod keyhash;
pub mod layer;
pub mod layout;
pub mod locator;
pub mod modify;
pub mod online;
pub mod probe;
pub mod read_cache;
pub mod relocate;
pub mod repair;
pub mod resize;
pub mod stack;

pub use footer::DiskType;
pub use image::VhdImage;
pub use layer::{VhdLayer, VhdOptions};

use super::{Backing, ImageError, ParentOpener};

/// Largest virtual disk: 2040 GiB, qemu's limit (0xff000000 sectors).
pub const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * 512;
/// Smallest block size accepted when opening (qemu's minimum).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted: keeps a block's bitmap and its
/// read-modify-write bounded.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest BAT read into memory (32 MiB of entries): 2040 GiB in 256 KiB
/// blocks, or blktap's preallocation for the maximum size in 2 MiB blocks.
pub const MAX_BAT_ENTRIES: u64 = 1 << 23;
/// Longest chain, leaf included.
pub use tapjail_common::worker_proto::MAX_CHAIN_DEPTH;

/// Open a VHD (fixed, dynamic or differencing with its whole chain).
/// Parents come from `opener` and are opened read-only.
pub fn open(
    leaf: Box<dyn Backing>,
    name: &str,
    read_only: bool,
    opener: &mut dyn ParentOpener,
    options: VhdOptions,
) -> Result<VhdImage, ImageError> {
    chain::open(leaf, name, read_only, opener, options)
}

/// Whether `file` looks like a VHD: a `conectix` cookie in the footer at
/// the end (512 or 511 bytes) or at offset 0.
pub fn is_vhd(file: &dyn Backing) -> Result<bool, ImageError> {
    let len = file.len().map_err(ImageError::io("stat", 0))?;
    let mut cookie = [0u8; 8];
    for off in [len.checked_sub(512), len.checked_sub(511), Some(0)]
        .into_iter()
        .flatten()
    {
        if off + 8 <= len {
            file.read_exact_at(&mut cookie, off)
                .map_err(ImageError::io("read", off))?;
            if &cookie == footer::COOKIE {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
