//! The offline tools' operations on paths (`tap-ctl vhd create`,
//! `snapshot`, `check`, `repair`, `query`, `resize`, `set-parent`,
//! `coalesce`), each also through a [`Paths`] for the confined parser.

use super::{
    not_own_parent, open_parent_via, open_vhd_in, parent_spec_in, write_new_file,
    write_new_file_in, Local, Opener, Paths,
};
use std::path::Path;
use tapjail_image::vhd::check::{check_with_progress, Problem};
use tapjail_image::vhd::coalesce::coalesce_into;
use tapjail_image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_image::vhd::footer::{format_uuid, Footer};
use tapjail_image::vhd::info::{query, Info};
use tapjail_image::vhd::layer::{VhdLayer, VhdOptions};
use tapjail_image::vhd::modify::set_parent;
use tapjail_image::vhd::repair::{repair_with_progress, RepairReport};
use tapjail_image::vhd::resize::resize;
use tapjail_image::{Backing, ImageError};

/// Create a new image file at `path`, which must not exist yet.
pub fn create_path(path: &Path, size: u64, kind: &CreateKind) -> Result<Footer, ImageError> {
    write_new_file(path, |f| create(&f, size, kind))
}

/// Create `child` as a differencing image of `parent`, as large as the
/// parent (`vhd-util snapshot`).
pub fn snapshot_path(child: &Path, parent: &Path, block_size: u32) -> Result<Footer, ImageError> {
    not_own_parent(child, parent)?;
    snapshot_in(&mut Local::default(), child, parent, block_size)
}

/// [`snapshot_path`] through `paths` (the caller checks [`not_own_parent`]).
pub fn snapshot_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
    block_size: u32,
) -> Result<Footer, ImageError> {
    let (spec, size) = parent_spec_in(paths, child, parent)?;
    create_child_in(paths, child, spec, size, block_size)
}

/// Write the new differencing image `child` of `size` bytes on the parent
/// `spec` describes (a VHD's or a raw file's).
pub(crate) fn create_child_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    spec: ParentSpec,
    size: u64,
    block_size: u32,
) -> Result<Footer, ImageError> {
    write_new_file_in(paths, child, |f| {
        create(
            &f,
            size,
            &CreateKind::Differencing {
                block_size,
                parent: spec,
            },
        )
    })
}

/// Check a VHD by path, including that its parent (if any) can be found
/// and carries the UUID it should, and that its whole chain opens.
pub fn check_path(path: &Path) -> Result<Vec<Problem>, ImageError> {
    check_in(&mut Local::default(), path)
}

/// [`check_path`] through `paths`.
pub fn check_in<P: Paths + ?Sized>(paths: &mut P, path: &Path) -> Result<Vec<Problem>, ImageError> {
    check_in_with_progress(paths, path, &mut |_, _| {})
}

/// [`check_in`], reporting `(done, total)` bytes of the image's blocks
/// checked (parents are opened, not scanned).
pub fn check_in_with_progress<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Problem>, ImageError> {
    let f = paths.open(path, false)?;
    let mut problems = check_with_progress(&f, progress);
    if problems.is_empty() {
        let layer = VhdLayer::open(
            Box::new(f),
            &path.to_string_lossy(),
            true,
            VhdOptions::default(),
        )?;
        if layer.parent_is_raw() {
            problems.extend(crate::raw_parent::raw_parent_problems(paths, &layer));
        } else if let Some(uuid) = layer.parent_uuid() {
            let locs = layer.parent_locators();
            match open_parent_via(paths, layer.name(), &locs, uuid, false) {
                // The field already says "parent": no "parent image:" again.
                Err(ImageError::Parent(m)) => problems.push(Problem {
                    field: "parent",
                    message: m,
                }),
                Err(e) => problems.push(Problem {
                    field: "parent",
                    message: e.to_string(),
                }),
                Ok((pf, pname)) => {
                    match VhdLayer::open(Box::new(pf), &pname, true, VhdOptions::default()) {
                        Err(e) => problems.push(Problem {
                            field: "parent",
                            message: format!("{pname}: {e}"),
                        }),
                        Ok(p) if p.uuid() != uuid => problems.push(Problem {
                            field: "parent",
                            message: format!(
                                "{pname} has UUID {}, the image expects {}",
                                format_uuid(&p.uuid()),
                                format_uuid(&uuid)
                            ),
                        }),
                        Ok(_) => {}
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        // The whole chain above must open too (no loop, nothing missing
        // or damaged further up).
        if let Err(e) = open_vhd_in(paths, path, true, VhdOptions::default()) {
            problems.push(Problem {
                field: "parent chain",
                message: e.to_string(),
            });
        }
    }
    Ok(problems)
}

/// Repair a VHD by path.
pub fn repair_path(path: &Path) -> Result<RepairReport, ImageError> {
    repair_in(&mut Local::default(), path)
}

/// [`repair_path`] through `paths`.
pub fn repair_in<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
) -> Result<RepairReport, ImageError> {
    repair_in_with_progress(paths, path, &mut |_, _| {}, &mut |_, _| {})
}

/// [`repair_in`]; `rebuild` follows a batmap rebuild (if one is needed)
/// and `verify` the closing check, each in bytes of allocated blocks.
pub fn repair_in_with_progress<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    rebuild: &mut dyn FnMut(u64, u64),
    verify: &mut dyn FnMut(u64, u64),
) -> Result<RepairReport, ImageError> {
    let mut report = repair_with_progress(&paths.open(path, true)?, rebuild)?;
    // What is left, parents included, exactly as `check` lists it.
    report.remaining = check_in_with_progress(paths, path, verify)?;
    Ok(report)
}

/// Query a VHD by path; `parent` is the parent as found on the filesystem
/// (or as recorded, when it cannot be found).
pub fn query_path(path: &Path) -> Result<Info, ImageError> {
    query_in(&mut Local::default(), path)
}

/// [`query_path`] through `paths`.
pub fn query_in<P: Paths + ?Sized>(paths: &mut P, path: &Path) -> Result<Info, ImageError> {
    let f = paths.open(path, false)?;
    let (mut info, layer) = query(Box::new(f), &path.to_string_lossy())?;
    if let Some(uuid) = layer.parent_uuid() {
        let locs = layer.parent_locators();
        info.parent = match open_parent_via(paths, layer.name(), &locs, uuid, false) {
            Ok((_, name)) => Some(name),
            // Not found: the first locator, taken from the child's
            // directory as it is written (the caller's view of the path).
            Err(_) => locs.first().map(|l| {
                if l.relative {
                    let dir = path.parent().unwrap_or(Path::new(""));
                    dir.join(&l.path).to_string_lossy().into_owned()
                } else {
                    l.path.clone()
                }
            }),
        };
    }
    Ok(info)
}

/// Grow a VHD by path.
pub fn resize_path(path: &Path, size: u64) -> Result<(), ImageError> {
    resize_in(&mut Local::default(), path, size)
}

/// [`resize_path`] through `paths`.
pub fn resize_in<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    size: u64,
) -> Result<(), ImageError> {
    let f = paths.open(path, true)?;
    refuse_outgrowing_a_raw_parent(paths, path, size)?;
    resize(&f, size)
}

/// A child larger than its raw parent cannot be opened again: reads past
/// the raw file's end fail (in blktap too), so the engine refuses such a
/// chain. Say so before writing anything, rather than leave an image that
/// no longer opens.
pub(super) fn refuse_outgrowing_a_raw_parent<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    size: u64,
) -> Result<(), ImageError> {
    let (_, layer) = query(Box::new(paths.open(path, false)?), &path.to_string_lossy())?;
    let Some(uuid) = layer.parent_uuid().filter(|_| layer.parent_is_raw()) else {
        return Ok(());
    };
    let locators = layer.parent_locators();
    let (parent, name) = open_parent_via(paths, layer.name(), &locators, uuid, false)?;
    let parent_len = Backing::len(&parent).map_err(|source| ImageError::Io {
        op: "stat raw parent",
        offset: 0,
        source,
    })?;
    if size > parent_len {
        return Err(ImageError::InvalidArgument(format!(
            "{} has the raw parent {name} of {parent_len} bytes: a child of {size} bytes \
             could not be opened (reads past the raw file's end fail); grow {name} first \
             (e.g. truncate -s {size}), then resize the child",
            path.display()
        )));
    }
    Ok(())
}

/// The UUIDs of the image at `path` and of the parents that can be found
/// above it, leaf first. The walk stops at the root, at the first parent
/// that cannot be opened, at a repeated UUID (a loop: that UUID is the
/// last one returned) or at the engine's longest chain.
pub(super) fn chain_uuids<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
) -> Result<Vec<[u8; 16]>, ImageError> {
    let mut layer = VhdLayer::open(
        Box::new(paths.open(path, false)?),
        &path.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    let mut uuids = vec![layer.uuid()];
    while uuids.len() < tapjail_image::vhd::MAX_CHAIN_DEPTH {
        let Some(puuid) = layer.parent_uuid().filter(|u| *u != [0; 16]) else {
            break;
        };
        let Ok((pf, pname)) =
            open_parent_via(paths, layer.name(), &layer.parent_locators(), puuid, false)
        else {
            break;
        };
        let Ok(parent) = VhdLayer::open(Box::new(pf), &pname, true, VhdOptions::default()) else {
            break;
        };
        let again = uuids.contains(&parent.uuid());
        uuids.push(parent.uuid());
        if again {
            break;
        }
        layer = parent;
    }
    Ok(uuids)
}

/// Point `child` at `parent` (`vhd-util modify -p`). Refused when that
/// would make a loop: `parent` is `child` itself or one of its
/// descendants (its chain leads back to `child`).
pub fn set_parent_path(child: &Path, parent: &Path) -> Result<(), ImageError> {
    set_parent_in(&mut Local::default(), child, parent)
}

/// [`set_parent_path`] through `paths`.
pub fn set_parent_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
) -> Result<(), ImageError> {
    let cf = paths.open(child, true)?;
    let child_uuid = tapjail_image::vhd::layout::Metadata::read(&cf)?
        .footer
        .uuid();
    if chain_uuids(paths, parent)?.contains(&child_uuid) {
        return Err(ImageError::InvalidArgument(format!(
            "{} cannot be the parent of {}: it is that image or is based on it, \
             which would make a parent loop",
            parent.display(),
            child.display()
        )));
    }
    let (spec, _) = parent_spec_in(paths, child, parent)?;
    set_parent(&cf, &spec)
}

/// Merge `child` into its parent (found under the locator rule, or named,
/// and opened writable; its own chain read-only). A parent smaller than
/// the child is grown first. Returns the parent's name and the bytes
/// copied.
pub fn coalesce_path(
    child: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64), ImageError> {
    coalesce_in(&mut Local::default(), child, progress)
}

/// [`coalesce_path`] through `paths`.
pub fn coalesce_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64), ImageError> {
    let cf = paths.open(child, false)?;
    let layer = VhdLayer::open(
        Box::new(cf),
        &child.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    let uuid = layer.parent_uuid().ok_or_else(|| {
        ImageError::InvalidArgument(format!(
            "{} is not a differencing image, so it has no parent to merge into; coalesce \
             takes a child made by `tap-ctl vhd snapshot`",
            child.display()
        ))
    })?;
    if layer.parent_is_raw() {
        return crate::raw_parent::coalesce_raw_in(paths, &layer, progress);
    }
    let locs = layer.parent_locators();
    let (pf, pname) = match open_parent_via(paths, layer.name(), &locs, uuid, true) {
        Ok(found) => found,
        Err(e) => {
            // Say so when the parent is there but not writable.
            let Ok((_, pname)) = open_parent_via(paths, layer.name(), &locs, uuid, false) else {
                return Err(e);
            };
            return Err(ImageError::InvalidArgument(format!(
                "{pname}, the parent of {}, cannot be opened for writing, which coalesce \
                 needs (it merges into the parent): {e}",
                child.display()
            )));
        }
    };
    let pmeta = tapjail_image::vhd::layout::Metadata::read(&pf)?;
    if pmeta.footer.uuid() != uuid {
        return Err(ImageError::ParentUuidMismatch {
            name: pname,
            expected: format_uuid(&uuid),
            found: format_uuid(&pmeta.footer.uuid()),
        });
    }
    if pmeta.virtual_size < layer.virtual_size() {
        resize(&pf, layer.virtual_size())?;
    }
    let parent = tapjail_image::vhd::chain::open(
        Box::new(pf),
        &pname,
        false,
        &mut Opener(paths),
        VhdOptions {
            sync_metadata: false,
        },
    )?;
    let copied = coalesce_into(&layer, &parent, progress)?;
    Ok((pname, copied))
}
