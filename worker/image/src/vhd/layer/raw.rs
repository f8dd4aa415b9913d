//! A raw file as the parent of a differencing VHD (`vhd-util snapshot -m`).
//!
//! blktap marks such a child only by a null parent UUID in its dynamic
//! header (libvhd's `vhd_parent_raw`); the rest is as for a VHD parent:
//! the parent's file name, `MacX`/`W2ku`/`W2ru` locators, the parent's
//! mtime as parent timestamp, and a virtual size equal to the raw file's.
//!
//! The parent is served as a layer without metadata: every byte of the file
//! is disk, mapped one to one like a fixed VHD's data. Being a layer, not an
//! image of its own, it needs no second path through the chain code (reads
//! falling through, block status, direct mappings, stats, coalesce).

use super::VhdLayer;
use crate::stats::LayerCounters;
use crate::vhd::footer::{DiskType, Footer};
use crate::vhd::layer::VhdOptions;
use crate::{Backing, ImageError};

impl VhdLayer {
    /// Serve `file` as a raw layer of its own length. Only a raw parent is
    /// opened this way (writable only to coalesce a child into it).
    pub fn open_raw(
        file: Box<dyn Backing>,
        name: &str,
        read_only: bool,
    ) -> Result<VhdLayer, ImageError> {
        let len = file.len().map_err(ImageError::io("stat raw parent", 0))?;
        // Made up, never written: the file has no footer.
        let footer = Footer::new(DiskType::Fixed, len, [0; 16], 0);
        Ok(VhdLayer {
            file,
            name: name.to_string(),
            footer_bytes: footer.to_bytes(),
            footer,
            virtual_size: len,
            read_only,
            encrypted: false,
            cipher: None,
            options: VhdOptions::default(),
            sparse: None,
            raw: true,
            counters: LayerCounters::default(),
        })
    }

    /// Whether this layer is a raw file (a raw parent), not a VHD.
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Whether this differencing image's parent is a raw file: its header
    /// records a null parent UUID, as libvhd's `vhd_parent_raw` decides.
    pub fn parent_is_raw(&self) -> bool {
        self.parent_uuid() == Some([0; 16])
    }
}

/// Open `file` as the raw parent of `child`. A file that shows any sign of
/// a VHD is refused (never guessed to be raw), and so is a parent shorter
/// than the child's virtual size: the child's reads past its end would
/// fail (as in blktap, whose `__raw_read_link` gets a short read), so the
/// file is not the one the child was made from, or it was truncated.
pub fn open_raw_parent(
    child: &VhdLayer,
    file: Box<dyn Backing>,
    name: &str,
    read_only: bool,
) -> Result<VhdLayer, ImageError> {
    if let Some(sign) = crate::vhd::probe::vhd_sign(file.as_ref())? {
        // Served as raw, its metadata would show as disk data.
        return Err(ImageError::Parent(format!(
            "{name}, recorded as the raw parent of {}, shows {sign}: it is a VHD, not a \
             raw image, and is not served as raw; point the child at its real parent with \
             `tap-ctl vhd set-parent` (-m for a raw one)",
            child.name()
        )));
    }
    let parent = VhdLayer::open_raw(file, name, read_only)?;
    let (have, want) = (parent.virtual_size(), child.virtual_size());
    if have < want {
        return Err(ImageError::Parent(too_small(
            name,
            child.name(),
            have,
            want,
        )));
    }
    Ok(parent)
}

/// Why a raw parent of `have` bytes cannot back a child of `want` bytes.
pub fn too_small(parent: &str, child: &str, have: u64, want: u64) -> String {
    format!(
        "{parent}, the raw parent of {child}, is {have} bytes, smaller than the child's \
         virtual size of {want} bytes: it is not the file the child was made from, or it \
         was truncated; restore the parent (the child holds only the sectors written to it)"
    )
}
