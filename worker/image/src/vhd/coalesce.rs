//! `tap-ctl vhd coalesce`: copy every sector a differencing child holds
//! into its parent, so the parent alone reads as the child did. The child
//! is left as it was (now redundant; delete or re-snapshot it).

use super::footer::DiskType;
use super::layer::VhdLayer;
use crate::{Image, ImageError};

/// Bytes copied per step.
const CHUNK: u64 = 4 << 20;

/// Copy `child`'s own sectors into `parent` (an image opened writable
/// whose leaf is the child's parent). `progress(done, total)` is called
/// with virtual byte positions. Returns the bytes copied.
pub fn coalesce_into(
    child: &VhdLayer,
    parent: &dyn Image,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, ImageError> {
    if child.disk_type() != DiskType::Differencing {
        return Err(ImageError::InvalidArgument(format!(
            "{} is not a differencing image",
            child.name()
        )));
    }
    let size = child.virtual_size();
    if parent.virtual_size() < size {
        return Err(ImageError::InvalidArgument(format!(
            "the parent ({} bytes) is smaller than {} ({size} bytes); resize it first",
            parent.virtual_size(),
            child.name()
        )));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    let mut off = 0;
    while off < size {
        let (n, loc) = child.map(off, (size - off).min(CHUNK))?;
        let n = n.clamp(1, size - off);
        if let Some(file_off) = loc {
            let piece = &mut buf[..n as usize];
            child.read_data(piece, file_off)?;
            parent.write_at(piece, off)?;
            copied += n;
        }
        off += n;
        progress(off, size);
    }
    parent.flush()?;
    Ok(copied)
}
