//! Raw parents in the offline tools: a differencing VHD whose parent is a
//! raw file, as `vhd-util snapshot -m` makes it. Creating one
//! ([`snapshot_raw_in`]), checking one ([`raw_parent_problems`]) and
//! coalescing a child into its raw parent ([`coalesce_raw_in`], as
//! `vhd-util coalesce` does). Reading and converting need nothing here:
//! the engine's chain opener serves the raw parent.
//!
//! The raw parent is found like any parent (the locator rule of
//! [`crate::files`], or `--parent`). It must not look like a VHD: a VHD
//! read as raw would show its metadata as disk data, so a file with any
//! sign of one is refused as a raw parent, never guessed.

use crate::files::{create_child_in, open_parent_via, parent_record, Paths};
use std::fs::File;
use std::path::Path;
use tapjail_image::vhd::check::Problem;
use tapjail_image::vhd::coalesce::coalesce_into;
use tapjail_image::vhd::create::{validate_size, ParentSpec};
use tapjail_image::vhd::footer::Footer;
use tapjail_image::vhd::image::VhdImage;
use tapjail_image::vhd::layer::raw::too_small;
use tapjail_image::vhd::layer::VhdLayer;
use tapjail_image::vhd::probe::vhd_sign;
use tapjail_image::{Backing, ImageError};

/// Refuse `file` (named `name`) as a raw parent if it shows a VHD's sign.
fn not_a_vhd(file: &File, name: &str, what: &str) -> Result<(), ImageError> {
    match vhd_sign(file)? {
        None => Ok(()),
        Some(sign) => Err(ImageError::InvalidArgument(format!(
            "{name} shows {sign}: it is a VHD, not a raw image, so it cannot be {what}"
        ))),
    }
}

/// What a child of the raw file `parent` (to be created at `child`)
/// records, and its virtual size (the file's): null parent UUID, the
/// parent's mtime, name and locators as for a VHD parent. A file that
/// looks like a VHD, or whose size is not whole sectors, is refused.
pub fn raw_parent_spec_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
) -> Result<(ParentSpec, u64), ImageError> {
    let pf = paths.open(parent, false)?;
    let pname = parent.display().to_string();
    not_a_vhd(
        &pf,
        &pname,
        "a raw parent (-m); drop -m to snapshot it as a VHD",
    )?;
    let size = Backing::len(&pf).map_err(ImageError::io("stat", 0))?;
    validate_size(size).map_err(|_| {
        ImageError::InvalidArgument(format!(
            "{pname} is {size} bytes: a raw parent must be a positive whole number of \
             512-byte sectors of at most {} bytes, since the child's virtual size is the \
             parent's size",
            tapjail_image::vhd::MAX_VIRTUAL_SIZE
        ))
    })?;
    Ok((parent_record(child, parent, &pf)?, size))
}

/// Create `child` as a differencing image of the raw file `parent`, as
/// large as the file (`vhd-util snapshot -m`; see [`raw_parent_spec_in`]).
pub fn snapshot_raw_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
    block_size: u32,
) -> Result<Footer, ImageError> {
    let (spec, size) = raw_parent_spec_in(paths, child, parent)?;
    create_child_in(paths, child, spec, size, block_size)
}

/// When a snapshot without `-m` fails on `parent`: if the file shows no
/// sign of a VHD, the message that says to use `-m`.
pub fn raw_parent_hint<P: Paths + ?Sized>(paths: &mut P, parent: &Path) -> Option<String> {
    let pf = paths.open(parent, false).ok()?;
    match vhd_sign(&pf) {
        Ok(None) => Some(format!(
            "{} is not a VHD image (no VHD footer or header in it); if it is a raw disk image, \
             say -m (--raw-parent) to make a child of a raw parent, as `vhd-util snapshot -m`",
            parent.display()
        )),
        _ => None,
    }
}

/// What is wrong with the raw parent of `child` (a layer whose parent is
/// raw): it cannot be found, it looks like a VHD, or it is shorter than
/// the child's virtual size. blktap's check only looks for the file; the
/// last two make reads wrong or failing, so they are problems here too.
pub fn raw_parent_problems<P: Paths + ?Sized>(paths: &mut P, child: &VhdLayer) -> Vec<Problem> {
    let problem = |message: String| Problem {
        field: "raw parent",
        message,
    };
    let locs = child.parent_locators();
    let (pf, pname) = match open_parent_via(paths, child.name(), &locs, [0; 16], false) {
        Ok(found) => found,
        Err(e) => return vec![problem(e.to_string())],
    };
    if let Err(e) = not_a_vhd(&pf, &pname, "the raw parent the image records") {
        return vec![problem(e.to_string())];
    }
    match Backing::len(&pf) {
        Ok(have) if have < child.virtual_size() => vec![problem(too_small(
            &pname,
            child.name(),
            have,
            child.virtual_size(),
        ))],
        Ok(_) => Vec::new(),
        Err(e) => vec![problem(format!("{pname}: {e}"))],
    }
}

/// Merge `child` (whose parent is raw) into its raw parent, opened
/// writable: every sector the child holds is written into the file at
/// the same offset (`vhd-util coalesce` into a raw parent). Returns the
/// parent's name and the bytes copied.
pub fn coalesce_raw_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &VhdLayer,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64), ImageError> {
    let locs = child.parent_locators();
    let (pf, pname) = match open_parent_via(paths, child.name(), &locs, [0; 16], true) {
        Ok(found) => found,
        Err(e) => {
            let Ok((_, pname)) = open_parent_via(paths, child.name(), &locs, [0; 16], false) else {
                return Err(e);
            };
            return Err(ImageError::InvalidArgument(format!(
                "{pname}, the raw parent of {}, cannot be opened for writing, which \
                 coalesce needs (it merges into the parent): {e}",
                child.name()
            )));
        }
    };
    let parent =
        tapjail_image::vhd::layer::raw::open_raw_parent(child, Box::new(pf), &pname, false)?;
    let parent = VhdImage::from_layers(vec![parent])?;
    let copied = coalesce_into(child, &parent, progress)?;
    Ok((pname, copied))
}

/// Point the differencing image `child` at the raw file `parent`
/// (`vhd-util modify -p PARENT -m`): null parent UUID, the file's mtime,
/// name and locators. A file that looks like a VHD, or is shorter than
/// the child's virtual size, is refused.
pub fn set_raw_parent_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
) -> Result<(), ImageError> {
    let cf = paths.open(child, true)?;
    let want = tapjail_image::vhd::layout::Metadata::read(&cf)?.virtual_size;
    let pf = paths.open(parent, false)?;
    let pname = parent.display().to_string();
    not_a_vhd(
        &pf,
        &pname,
        "a raw parent (-m); drop -m to make it a VHD parent",
    )?;
    let have = Backing::len(&pf).map_err(ImageError::io("stat", 0))?;
    if have < want {
        return Err(ImageError::InvalidArgument(too_small(
            &pname,
            &child.display().to_string(),
            have,
            want,
        )));
    }
    let spec = parent_record(child, parent, &pf)?;
    tapjail_image::vhd::modify::set_parent(&cf, &spec)
}
