//! `tap-ctl vhd check`: every inconsistency of one image, listed.

use super::bat::UNUSED;
use super::bitmap;
use super::footer::{DiskType, FILE_FORMAT_VERSION};
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

/// Which tool fixes a problem, as `check` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// `tap-ctl vhd repair`: footers and batmaps.
    Repair,
    /// `tap-ctl vhd set-parent`: where the parent is.
    SetParent,
    /// Nothing rewrites this without guessing at data.
    None,
}

impl Problem {
    /// The tool that fixes this problem.
    pub fn fix(&self) -> Fix {
        match self.field {
            "footer" | "footer.cookie" | "footer.checksum" | "batmap" | "bat.placement" => {
                Fix::Repair
            }
            "parent" | "raw parent" | "parent chain" | "header.parent_uuid" => Fix::SetParent,
            _ => Fix::None,
        }
    }

    /// What to do about it, for the end of a message.
    pub fn fix_hint(&self) -> &'static str {
        match self.fix() {
            Fix::Repair => "`tap-ctl vhd repair` fixes this",
            Fix::SetParent if self.field == "raw parent" => {
                "`tap-ctl vhd set-parent -m` fixes this (`repair` does not touch parents)"
            }
            Fix::SetParent => {
                "`tap-ctl vhd set-parent` fixes this (`repair` does not touch parents)"
            }
            Fix::None => "no tool fixes this without losing data: restore the image from a copy",
        }
    }
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
    check_with_progress(file, &mut |_, _| {})
}

/// [`check`], calling `progress(done, total)` in bytes of allocated
/// blocks as their bitmaps are read (the part that grows with the
/// image), and `(total, total)` once at the end.
pub fn check_with_progress(file: &dyn Backing, progress: &mut dyn FnMut(u64, u64)) -> Vec<Problem> {
    let mut total = 0;
    let problems = check_blocks(file, &mut |d, t| {
        total = t;
        progress(d, t)
    });
    progress(total, total);
    problems
}

fn check_blocks(file: &dyn Backing, progress: &mut dyn FnMut(u64, u64)) -> Vec<Problem> {
    let meta = match Metadata::read_with(file, false) {
        Ok(m) => m,
        Err(e) => return vec![e.into()],
    };
    let mut problems: Vec<Problem> = meta.findings.iter().cloned().map(Into::into).collect();
    footer_problems(&meta, &mut problems);
    if let Some(s) = &meta.sparse {
        let batmap = match &s.batmap {
            BatmapState::Valid { map, .. } => Some(map),
            _ => None,
        };
        let sum_bits = super::batmap::checksum_len(meta.footer.current_size()) * 8;
        let spb = (s.block_size / 512) as usize;
        let mut buf = vec![0u8; s.bitmap_bytes as usize];
        let bs = u64::from(s.block_size);
        let total = s.bat.iter().filter(|&&e| e != UNUSED).count() as u64 * bs;
        let mut done = 0u64;
        for (b, &e) in s.bat.iter().enumerate() {
            if e == UNUSED {
                continue;
            }
            done += bs;
            progress(done, total);
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
        if let Some(m) = batmap {
            let n = (s.bat.len() as u64).min(sum_bits).min(m.len() as u64 * 8) as usize;
            let bogus: Vec<usize> = (0..n)
                .filter(|&b| s.bat[b] == UNUSED && bitmap::test(m, b))
                .collect();
            if let Some(&first) = bogus.first() {
                problems.push(Problem {
                    field: "batmap",
                    message: format!(
                        "{} unallocated block(s) (first: block {first}) are marked fully written",
                        bogus.len()
                    ),
                });
            }
        }
        for (b, start) in super::relocate::blocks_before_metadata(s) {
            problems.push(Problem {
                field: "bat.placement",
                message: format!(
                    "block {b} clobbers metadata: it starts at byte {start}, before the \
                     metadata ends at byte {}; blktap's tools refuse this layout \
                     (vhd-util check: \"block {b} clobbers headers\")",
                    s.metadata_end
                ),
            });
        }
        if meta.footer.disk_type == DiskType::Dynamic {
            let h = &s.header;
            if h.parent_uuid() != [0; 16] || h.locators.iter().any(|l| l.is_used()) {
                problems.push(Problem {
                    field: "footer.disk_type",
                    message: "the footer says dynamic, but the dynamic header names a parent: \
                              a differencing image relabelled, whose parent's data is not shown"
                        .into(),
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
                // A length `Metadata` already flagged is never a buffer
                // size: the file says it, so it may be 4 GiB.
                let len_ok = loc.data_len <= locator::MAX_LOCATOR_LEN
                    && loc
                        .space_bytes()
                        .is_some_and(|space| u64::from(loc.data_len) <= space);
                if !loc.code.is_readable() || !len_ok {
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
            // A null parent UUID marks a raw parent (libvhd's `vhd_parent_raw`).
        }
    }
    problems
}

/// Metadata of a file that passes the strict checks, for tools that
/// modify images and refuse broken ones.
pub fn metadata_for_update(file: &dyn Backing) -> Result<Metadata, ImageError> {
    Metadata::read(file)
}

/// Footer fields that open but serve a disk other than the one meant.
fn footer_problems(meta: &Metadata, problems: &mut Vec<Problem>) {
    let f = &meta.footer;
    let version = f.file_format_version();
    if version != FILE_FORMAT_VERSION {
        problems.push(Problem {
            field: "footer.version",
            message: format!(
                "file format version {}.{} (only 1.0 exists)",
                version >> 16,
                version & 0xffff
            ),
        });
    }
    if f.size_from_current_size() && !f.current_size().is_multiple_of(512) {
        problems.push(Problem {
            field: "footer.current_size",
            message: format!(
                "{} bytes is not a whole number of 512-byte sectors; the last {} bytes \
                 are not served",
                f.current_size(),
                f.current_size() % 512
            ),
        });
    }
    if meta.virtual_size == 0 {
        problems.push(Problem {
            field: "footer.current_size",
            message: "the disk is 0 bytes long: every read fails".into(),
        });
    }
}
