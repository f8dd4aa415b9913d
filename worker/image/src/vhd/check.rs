//! `tap-ctl vhd check`: every inconsistency of one image, listed.

use super::bat::UNUSED;
use super::bitmap;
use super::footer::DiskType;
use super::layout::{BatmapState, Finding, Metadata};
use super::locator;
use crate::{Backing, ImageError};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The structure at fault (`footer`, `bat`, `batmap`, ...).
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl From<Finding> for Problem {
    fn from(f: Finding) -> Self {
        Problem {
            field: f.field,
            message: f.message,
        }
    }
}

impl From<ImageError> for Problem {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Corrupt { field, reason } => Problem {
                field,
                message: reason,
            },
            other => Problem {
                field: "image",
                message: other.to_string(),
            },
        }
    }
}

/// Check one VHD file (not its parents). Empty means consistent.
pub fn check(file: &dyn Backing) -> Vec<Problem> {
    let meta = match Metadata::read_with(file, false) {
        Ok(m) => m,
        Err(e) => return vec![e.into()],
    };
    let mut problems: Vec<Problem> = meta.findings.iter().cloned().map(Into::into).collect();
    if let Some(s) = &meta.sparse {
        let batmap = match &s.batmap {
            BatmapState::Valid { map, .. } => Some(map),
            _ => None,
        };
        let sum_bits = super::batmap::checksum_len(meta.footer.current_size()) * 8;
        let spb = (s.block_size / 512) as usize;
        let mut buf = vec![0u8; s.bitmap_bytes as usize];
        for (b, &e) in s.bat.iter().enumerate() {
            if e == UNUSED {
                continue;
            }
            let off = u64::from(e) * 512;
            if let Err(err) = file.read_exact_at(&mut buf, off) {
                problems.push(ImageError::io("read bitmap", off)(err).into());
                continue;
            }
            let claimed_full = batmap
                .is_some_and(|m| (b as u64) < sum_bits && (b / 8) < m.len() && bitmap::test(m, b));
            if claimed_full && !bitmap::is_full(&buf, spb) {
                problems.push(Problem {
                    field: "batmap",
                    message: format!(
                        "block {b} is marked fully written but its sector bitmap is not full"
                    ),
                });
            }
        }
        if s.allocated_beyond_size > 0 {
            problems.push(Problem {
                field: "bat",
                message: format!(
                    "{} blocks are allocated beyond the virtual size",
                    s.allocated_beyond_size
                ),
            });
        }
        if meta.footer.disk_type == DiskType::Differencing {
            for (i, loc) in s.header.locators.iter().enumerate() {
                if !loc.code.is_readable() {
                    continue;
                }
                let mut data = vec![0u8; loc.data_len as usize];
                let r = file
                    .read_exact_at(&mut data, loc.data_offset)
                    .map_err(ImageError::io("read parent locator", loc.data_offset))
                    .and_then(|()| locator::decode(loc.code, &data));
                if let Err(e) = r {
                    problems.push(Problem {
                        field: "header.parent_locator",
                        message: format!("slot {i} ({}): {e}", loc.code.as_str()),
                    });
                }
            }
            if s.header.parent_uuid() == [0; 16] {
                problems.push(Problem {
                    field: "header.parent_uuid",
                    message: "null parent UUID (raw parents are not supported)".into(),
                });
            }
        }
    }
    problems
}

/// Metadata of a file that passes the strict checks, for tools that
/// modify images and refuse broken ones.
pub fn metadata_for_update(file: &dyn Backing) -> Result<Metadata, ImageError> {
    Metadata::read(file)
}
