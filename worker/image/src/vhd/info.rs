//! `tap-ctl vhd query`: what an image is, for people and for scripts.

use super::footer::{format_uuid, DiskType};
use super::layer::VhdLayer;
use super::layout::{BatmapState, Metadata};
use crate::{Backing, ImageError};

/// Facts about one VHD file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub virtual_size: u64,
    pub disk_type: DiskType,
    /// Where the parent was found, or what the image records (differencing).
    pub parent: Option<String>,
    pub parent_uuid: Option<String>,
    /// The parent is a raw file (a null parent UUID, libvhd's
    /// `vhd_parent_raw`).
    pub parent_raw: bool,
    pub block_size: Option<u64>,
    pub allocated_blocks: u64,
    pub physical_size: u64,
    pub uuid: String,
    pub creator: String,
    pub batmap: &'static str,
}

/// Read the facts of `file`; `parent` is filled in by the caller (only it
/// knows how to resolve locators).
pub fn query(file: Box<dyn Backing>, name: &str) -> Result<(Info, VhdLayer), ImageError> {
    let meta = Metadata::read(file.as_ref())?;
    let batmap = match meta.sparse.as_ref().map(|s| &s.batmap) {
        Some(BatmapState::Valid { .. }) => "valid",
        Some(BatmapState::Ignored { .. }) => "ignored",
        _ => "none",
    };
    let app = meta.footer.creator_app();
    let creator = format!(
        "{} {}.{}",
        super::footer::show_cookie(&app).trim_end_matches('.'),
        meta.footer.creator_version() >> 16,
        meta.footer.creator_version() & 0xffff
    );
    let physical_size = meta.file_len;
    let layer = VhdLayer::from_metadata(file, name, true, Default::default(), meta)?;
    let info = Info {
        virtual_size: layer.virtual_size(),
        disk_type: layer.disk_type(),
        parent: None,
        parent_uuid: layer.parent_uuid().map(|u| format_uuid(&u)),
        parent_raw: layer.parent_is_raw(),
        block_size: layer.block_size(),
        allocated_blocks: layer.allocated_blocks(),
        physical_size,
        uuid: format_uuid(&layer.uuid()),
        creator,
        batmap,
    };
    Ok((info, layer))
}
