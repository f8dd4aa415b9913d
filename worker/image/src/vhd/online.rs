//! Online coalesce, the engine's steps: copy one range of a served chain
//! between its leaf and its parent (qemu's block-stream and block-commit),
//! and drop a streamed leaf's parent from its metadata.
//!
//! The caller (the worker's merge job) decides the order and keeps guest
//! writes from racing a copied range: a stream step runs with writes to
//! its range held out, so parent data never lands over a guest write; a
//! commit step runs unlocked and its range is copied again if the guest
//! wrote to it meanwhile. Both copy whole sectors only where the source
//! layer holds them itself, so a step repeated after a crash copies the
//! same bytes again: every step is idempotent.

use super::footer::DiskType;
use super::image::VhdImage;
use super::layer::VhdLayer;
use crate::{Backing, ImageError};

/// Why an image cannot be merged online, or `None`.
pub fn refusal(img: &VhdImage) -> Option<String> {
    let layers = img.layers();
    if layers.len() < 2 {
        return Some(format!(
            "{} has no parent: there is nothing to coalesce",
            layers[0].name()
        ));
    }
    if let Some(l) = layers.iter().find(|l| l.cipher().is_some()) {
        return Some(format!(
            "{} is encrypted: online coalesce of encrypted chains is not supported \
             (pause and use `tap-ctl vhd coalesce`)",
            l.name()
        ));
    }
    if layers[0].disk_type() != DiskType::Differencing {
        return Some(format!("{} is not a differencing image", layers[0].name()));
    }
    None
}

/// Stream `[off, off + len)`: copy into the leaf every sector the leaf
/// lacks and its parent (layer 1) holds itself. Returns the bytes copied.
/// Writes to the range must be held out by the caller for the duration.
pub fn stream_range(
    img: &VhdImage,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, ImageError> {
    let layers = img.layers();
    let (leaf, parent) = match layers {
        [leaf, parent, ..] => (leaf, parent),
        _ => return Ok(0),
    };
    let end = off.saturating_add(len).min(leaf.virtual_size());
    let mut copied = 0;
    let mut pos = off;
    while pos < end {
        let (n, loc) = leaf.map(pos, end - pos)?;
        let n = n.clamp(1, end - pos);
        if loc.is_none() {
            copied += copy_own(parent, leaf, pos, pos + n, buf)?;
        }
        pos += n;
    }
    Ok(copied)
}

/// Commit `[off, off + len)`: copy every sector `leaf` holds itself into
/// `dst` (its parent, opened writable). Returns the bytes copied.
pub fn commit_range(
    leaf: &VhdLayer,
    dst: &VhdLayer,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, ImageError> {
    let end = off.saturating_add(len).min(leaf.virtual_size());
    copy_own(leaf, dst, off, end, buf)
}

/// Copy the sectors `src` holds itself in `[from, to)` into `dst`.
fn copy_own(
    src: &VhdLayer,
    dst: &VhdLayer,
    from: u64,
    to: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, ImageError> {
    let to = to.min(src.virtual_size()).min(dst.virtual_size());
    let mut copied = 0;
    let mut pos = from;
    while pos < to {
        let (n, loc) = src.map(pos, to - pos)?;
        let n = n.clamp(1, to - pos);
        if let Some(file_off) = loc {
            let n_us = usize::try_from(n)
                .map_err(|_| ImageError::InvalidArgument("copy step too large".into()))?;
            if buf.len() < n_us {
                buf.resize(n_us, 0);
            }
            let piece = &mut buf[..n_us];
            src.read_data(piece, file_off)?;
            dst.write_sectors(piece, pos)?;
            copied += n;
        }
        pos += n;
    }
    Ok(copied)
}

/// Make a streamed leaf stand alone: a dynamic image naming no parent,
/// so its clear sectors read as zeroes. Only valid once every sector its
/// parent (the chain's base) held is in the leaf and durable (flushed
/// before this is called). Crash-safe: see [`super::modify::detach_parent`].
pub fn detach_parent(file: &dyn Backing) -> Result<(), ImageError> {
    file.sync_data().map_err(ImageError::io("fsync", 0))?;
    super::modify::detach_parent(file)
}
