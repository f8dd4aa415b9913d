//! Reading and validating everything a VHD file says about itself: which
//! footer to trust, the dynamic header, the BAT, the batmap and the parent
//! locators, each bounds-checked against the file and against each other.
//!
//! A hostile image gets an [`ImageError::Corrupt`] naming the field, never a
//! panic, an overflow or an allocation larger than the `MAX_*` limits.

use super::batmap::BatmapHeader;
use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::header::Header;
use crate::{Backing, ImageError};

mod sparse;

use sparse::read_sparse;

/// A non-fatal finding: the image opens, but `check` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub field: &'static str,
    pub message: String,
}

/// Where the footer we use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterSource {
    /// The last 512 bytes of the file.
    End,
    /// The last 511 bytes (some writers leave a short footer).
    EndShort,
    /// The copy at offset 0 (dynamic and differencing images only), used
    /// when the end of the file holds no valid footer.
    Copy,
}

/// What became of the batmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatmapState {
    /// The image has none (not a blktap image, or an old one).
    Absent,
    /// Present and valid: the map (`header.size_sectors` sectors).
    Valid { header: BatmapHeader, map: Vec<u8> },
    /// Expected but unusable; the reason is also a [`Finding`]. `stale`:
    /// header and map are where they should be and only the contents
    /// disagree with the checksum (a crash between writing the map and its
    /// header), so `repair` can rebuild it in place.
    Ignored {
        reason: String,
        stale: Option<BatmapHeader>,
    },
}

/// Metadata of a dynamic or differencing image.
#[derive(Debug, Clone)]
pub struct Sparse {
    pub header: Header,
    pub block_size: u32,
    pub bitmap_bytes: u32,
    /// One entry per block of the virtual disk (not `max_table_entries`).
    pub bat: Vec<u32>,
    pub batmap: BatmapState,
    /// Blocks (of the whole table) allocated but beyond the virtual size.
    pub allocated_beyond_size: u32,
    /// Offset of the batmap header sector (right after the padded BAT).
    pub batmap_header_offset: u64,
    /// First byte after every metadata structure.
    pub metadata_end: u64,
    /// Where the next block goes: after all metadata and all blocks.
    pub data_end: u64,
    /// A batmap header (valid or not) carries blktap's keyhash: tapdisk
    /// encrypts this image's data, so nothing may write plaintext to it.
    pub encrypted: bool,
    /// The keyhash itself, when set (see [`super::crypt`]).
    pub keyhash: Option<super::crypt::Keyhash>,
}

/// Everything validated about one VHD file.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub file_len: u64,
    pub footer: Footer,
    pub footer_source: FooterSource,
    /// A valid footer sits at the end of the file (full or short).
    pub end_footer_ok: bool,
    pub virtual_size: u64,
    pub sparse: Option<Sparse>,
    pub findings: Vec<Finding>,
}

fn read_at(
    file: &dyn Backing,
    buf: &mut [u8],
    off: u64,
    what: &'static str,
) -> Result<(), ImageError> {
    file.read_exact_at(buf, off)
        .map_err(ImageError::io(what, off))
}

impl Sparse {
    /// The batmap header as read, valid or stale (not one that is absent
    /// or unparsable).
    pub fn batmap_header(&self) -> Option<&BatmapHeader> {
        match &self.batmap {
            BatmapState::Valid { header, .. } => Some(header),
            BatmapState::Ignored {
                stale: Some(header),
                ..
            } => Some(header),
            _ => None,
        }
    }
}

impl Metadata {
    /// Read and validate strictly: any inconsistency is an error.
    pub fn read(file: &dyn Backing) -> Result<Metadata, ImageError> {
        Self::read_with(file, true)
    }

    /// With `strict` false, bad BAT entries and locators become findings
    /// (and are treated as absent) so that `check` can list every problem;
    /// an unusable footer or header is still an error.
    pub fn read_with(file: &dyn Backing, strict: bool) -> Result<Metadata, ImageError> {
        let file_len = file.len().map_err(ImageError::io("stat", 0))?;
        let mut findings = Vec::new();
        let (footer, footer_source, end_footer_ok) = choose_footer(file, file_len, &mut findings)?;
        let virtual_size = footer.virtual_size()?;
        let footer_len = match footer_source {
            FooterSource::EndShort => FOOTER_SIZE as u64 - 1,
            _ => FOOTER_SIZE as u64,
        };
        // Where data may end: before the end footer when there is one.
        let limit = if end_footer_ok {
            file_len - footer_len
        } else {
            file_len
        };
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                if virtual_size > limit {
                    return Err(ImageError::corrupt(
                        "footer.current_size",
                        format!(
                            "a {virtual_size}-byte fixed disk needs {} bytes of file, \
                             the file has {file_len} (truncated?)",
                            virtual_size + footer_len
                        ),
                    ));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => Some(read_sparse(
                file,
                &footer,
                virtual_size,
                file_len,
                limit,
                strict,
                &mut findings,
            )?),
        };
        Ok(Metadata {
            file_len,
            footer,
            footer_source,
            end_footer_ok,
            virtual_size,
            sparse,
            findings,
        })
    }
}

/// Pick the footer to trust (see the module docs of `vhd` for why).
fn choose_footer(
    file: &dyn Backing,
    file_len: u64,
    findings: &mut Vec<Finding>,
) -> Result<(Footer, FooterSource, bool), ImageError> {
    if file_len < FOOTER_SIZE as u64 - 1 {
        return Err(ImageError::corrupt(
            "footer",
            format!("the file is {file_len} bytes, too short for a VHD footer"),
        ));
    }
    let mut end_err = None;
    let mut end = None;
    if file_len >= FOOTER_SIZE as u64 {
        let mut b = [0u8; FOOTER_SIZE];
        read_at(file, &mut b, file_len - FOOTER_SIZE as u64, "read footer")?;
        match Footer::parse(&b) {
            Ok(f) => end = Some((f, FooterSource::End)),
            Err(e) => end_err = Some(e),
        }
    }
    if end.is_none() && (file_len + 1).is_multiple_of(512) {
        let mut b = [0u8; FOOTER_SIZE - 1];
        read_at(
            file,
            &mut b,
            file_len - (FOOTER_SIZE as u64 - 1),
            "read footer",
        )?;
        if let Ok(f) = Footer::parse(&b) {
            end = Some((f, FooterSource::EndShort));
        }
    }
    let copy = if file_len >= FOOTER_SIZE as u64 {
        let mut b = [0u8; FOOTER_SIZE];
        read_at(file, &mut b, 0, "read footer copy")?;
        Some(Footer::parse(&b))
    } else {
        None
    };
    match (end, copy) {
        // A fixed image's first sector is guest data, whatever it looks like.
        (Some((f, src)), _) if f.disk_type == DiskType::Fixed => Ok((f, src, true)),
        (Some((f, src)), Some(Ok(c))) if c.disk_type.is_sparse() => {
            if c.uuid() != f.uuid() {
                // The end of the file is not ours (an interrupted block
                // allocation left guest data there): trust the copy.
                findings.push(Finding {
                    field: "footer",
                    message: "the footer at the end of the file belongs to another image; \
                              using the copy at offset 0"
                        .into(),
                });
                Ok((c, FooterSource::Copy, false))
            } else {
                if c.to_bytes() != f.to_bytes() {
                    findings.push(Finding {
                        field: "footer",
                        message: "the footer copy at offset 0 differs from the footer at the end"
                            .into(),
                    });
                }
                Ok((f, src, true))
            }
        }
        (Some((f, src)), copy) => {
            if let Some(Err(e)) = copy {
                findings.push(Finding {
                    field: "footer",
                    message: format!("the footer copy at offset 0 is invalid: {e}"),
                });
            }
            Ok((f, src, true))
        }
        (None, Some(Ok(c))) if c.disk_type.is_sparse() => {
            findings.push(Finding {
                field: "footer",
                message: "no valid footer at the end of the file (interrupted write?); \
                          using the copy at offset 0"
                    .into(),
            });
            Ok((c, FooterSource::Copy, false))
        }
        (None, _) => Err(end_err.unwrap_or_else(|| {
            ImageError::corrupt("footer.cookie", "no VHD footer at the end of the file")
        })),
    }
}
