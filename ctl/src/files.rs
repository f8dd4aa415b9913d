//! Offline helpers that work on paths: the filesystem [`ParentOpener`] and
//! opening images by path. Only the `tap-ctl vhd` tools and tests use
//! these; a confined worker never opens a path (its parents come from the
//! broker).

use tapjail_image::vhd::check::{check, Problem};
use tapjail_image::vhd::coalesce::coalesce_into;
use tapjail_image::vhd::convert::{copy_image, ImageSink, RawSink};
use tapjail_image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_image::vhd::footer::{format_uuid, Footer};
use tapjail_image::vhd::image::VhdImage;
use tapjail_image::vhd::info::{query, Info};
use tapjail_image::vhd::layer::{VhdLayer, VhdOptions};
use tapjail_image::vhd::locator::LocatorCode;
use tapjail_image::vhd::modify::set_parent;
use tapjail_image::vhd::repair::{repair, RepairReport};
use tapjail_image::vhd::resize::resize;
use tapjail_image::raw::RawImage;
use tapjail_image::Image;
use tapjail_image::{Backing, ImageError, ParentLocator, ParentOpener};
use std::fs::{File, OpenOptions};
use std::path::{Component, Path, PathBuf};

/// Resolves parent locators on the local filesystem, the way blktap's
/// `vhd_find_parent` does: relative locators (`./base.vhd`) against the
/// child's directory, absolute ones as they are. Among the candidates
/// that exist, the first whose UUID matches wins; failing that the first
/// that exists (the engine then reports the UUID mismatch).
#[derive(Debug, Default, Clone, Copy)]
pub struct FsParentOpener;

impl FsParentOpener {
    /// Candidate paths for a parent, in the order they are tried.
    pub fn candidates(child: &str, locators: &[ParentLocator]) -> Vec<PathBuf> {
        let dir = Path::new(child)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut out: Vec<PathBuf> = Vec::new();
        let relative = locators.iter().filter(|l| l.relative);
        let absolute = locators.iter().filter(|l| !l.relative);
        for l in relative.chain(absolute) {
            let joined = if l.relative {
                dir.join(&l.path)
            } else {
                PathBuf::from(&l.path)
            };
            // Drop `.` components (harmless to remove, unlike `..`).
            let p: PathBuf = joined
                .components()
                .filter(|c| *c != Component::CurDir)
                .collect();
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// The UUID in a file's footer, if it has one.
fn peek_uuid(file: &File) -> Option<[u8; 16]> {
    let len = Backing::len(file).ok()?;
    let mut b = [0u8; 512];
    for off in [len.checked_sub(512)?, 0] {
        if Backing::read_exact_at(file, &mut b, off).is_ok() {
            if let Ok(f) = Footer::parse(&b) {
                return Some(f.uuid());
            }
        }
    }
    None
}

impl ParentOpener for FsParentOpener {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        let candidates = Self::candidates(child, locators);
        let mut fallback = None;
        for c in &candidates {
            // Not File::open: a locator naming a FIFO must not hang us.
            let Ok(f) = open_file(c, true) else { continue };
            if !f.metadata().is_ok_and(|m| m.is_file()) {
                continue;
            }
            let name = c.to_string_lossy().into_owned();
            if peek_uuid(&f) == Some(parent_uuid) {
                return Ok((Box::new(f), name));
            }
            if fallback.is_none() {
                fallback = Some((f, name));
            }
        }
        match fallback {
            Some((f, name)) => Ok((Box::new(f), name)),
            None => Err(ImageError::Parent(format!(
                "the parent of {child} was not found (tried {})",
                if candidates.is_empty() {
                    "nothing: the image records no usable parent locator".to_string()
                } else {
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))),
        }
    }
}

/// What kind of file `t` is, for "X is a FIFO, not an image file".
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Open a file for an offline tool, read-write unless `read_only`. Only
/// regular files and block devices are images: anything else is refused
/// by name. The open itself is non-blocking, so that a FIFO (which would
/// wait for a writer forever) is refused instead of hanging the tool.
pub fn open_file(path: &Path, read_only: bool) -> Result<File, ImageError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EISDIR) => not_an_image(path, "directory"),
            _ => ImageError::Io {
                op: "open",
                offset: 0,
                source,
            },
        })?;
    let t = f.metadata().map_err(ImageError::io("stat", 0))?.file_type();
    if !(t.is_file() || t.is_block_device()) {
        return Err(not_an_image(path, file_kind(t)));
    }
    // Back to blocking I/O for the image itself.
    clear_nonblock(&f).map_err(ImageError::io("fcntl", 0))?;
    Ok(f)
}

/// Clear `O_NONBLOCK` on an open file.
fn clear_nonblock(f: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on an fd we own; integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl(F_SETFL) on an fd we own; integer arguments only.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn not_an_image(path: &Path, kind: &str) -> ImageError {
    ImageError::InvalidArgument(format!(
        "{} is a {kind}, not an image file (a regular file or a block device)",
        path.display()
    ))
}

/// Open a VHD and its chain by path, parents found on the filesystem.
pub fn open_vhd(path: &Path, read_only: bool, options: VhdOptions) -> Result<VhdImage, ImageError> {
    let f = open_file(path, read_only)?;
    tapjail_image::vhd::chain::open(
        Box::new(f),
        &path.to_string_lossy(),
        read_only,
        &mut FsParentOpener,
        options,
    )
}

/// Create the file `path` and fill it with `fill`. The name must be new:
/// the offline tools never replace an existing file, which could be the
/// very image being read (`convert a.vhd a.vhd`), a hard link to it, or a
/// parent in its chain. If `fill` fails, the half-written file is removed
/// so that nothing that looks like an image but is not is left behind.
pub fn write_new_file<T>(
    path: &Path,
    fill: impl FnOnce(File) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ImageError::InvalidArgument(format!(
                    "{} already exists: remove it first or choose another name",
                    path.display()
                ))
            } else {
                ImageError::Io {
                    op: "create",
                    offset: 0,
                    source,
                }
            }
        })?;
    let r = fill(f);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Create a new image file at `path`, which must not exist yet.
pub fn create_path(path: &Path, size: u64, kind: &CreateKind) -> Result<Footer, ImageError> {
    write_new_file(path, |f| create(&f, size, kind))
}

/// What a child of `parent` (to be created at `child`) records about it:
/// UUID, modification time, file name, and locators: `W2ru` with the path
/// relative to the child's directory (`./base.vhd`, what blktap resolves),
/// then `W2ku` and `MacX` with the absolute path. Also the parent's
/// virtual size.
pub fn parent_spec(child: &Path, parent: &Path) -> Result<(ParentSpec, u64), ImageError> {
    let pf = open_file(parent, true)?;
    let mtime = pf
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs().saturating_sub(tapjail_image::vhd::footer::VHD_EPOCH))
        .unwrap_or(0);
    let layer = VhdLayer::open(
        Box::new(pf),
        &parent.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    let abs = normalize(&std::path::absolute(parent).map_err(ImageError::io("resolve path", 0))?);
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rel = relative_path(child_dir, &abs)?;
    let abs_s = abs.to_string_lossy().into_owned();
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((
        ParentSpec {
            uuid: layer.uuid(),
            timestamp: u32::try_from(mtime).unwrap_or(u32::MAX),
            name,
            locators: vec![
                (LocatorCode::W2ru, rel),
                (LocatorCode::W2ku, abs_s.clone()),
                (LocatorCode::MacX, abs_s),
            ],
        },
        layer.virtual_size(),
    ))
}

/// Create `child` as a differencing image of `parent`, as large as the
/// parent (`vhd-util snapshot`).
pub fn snapshot_path(child: &Path, parent: &Path, block_size: u32) -> Result<Footer, ImageError> {
    if let (Ok(a), Ok(b)) = (child.canonicalize(), parent.canonicalize()) {
        if a == b {
            return Err(ImageError::InvalidArgument(format!(
                "{} cannot be its own parent",
                child.display()
            )));
        }
    }
    let (spec, size) = parent_spec(child, parent)?;
    create_path(
        child,
        size,
        &CreateKind::Differencing {
            block_size,
            parent: spec,
        },
    )
}

/// Check a VHD by path, including that its parent (if any) can be found
/// and carries the UUID it should, and that its whole chain opens.
pub fn check_path(path: &Path) -> Result<Vec<Problem>, ImageError> {
    let f = open_file(path, true)?;
    let mut problems = check(&f);
    if problems.is_empty() {
        let layer = VhdLayer::open(
            Box::new(f),
            &path.to_string_lossy(),
            true,
            VhdOptions::default(),
        )?;
        if let Some(uuid) = layer.parent_uuid().filter(|u| *u != [0; 16]) {
            let locs = layer.parent_locators();
            match FsParentOpener.open_parent(layer.name(), &locs, uuid) {
                Err(e) => problems.push(Problem {
                    field: "parent",
                    message: e.to_string(),
                }),
                Ok((pf, pname)) => match VhdLayer::open(pf, &pname, true, VhdOptions::default()) {
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
                },
            }
        }
    }
    if problems.is_empty() {
        // The whole chain above must open too (no loop, nothing missing
        // or damaged further up).
        if let Err(e) = open_vhd(path, true, VhdOptions::default()) {
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
    repair(&open_file(path, false)?)
}

/// Query a VHD by path; `parent` is the parent as found on the filesystem
/// (or as recorded, when it cannot be found).
pub fn query_path(path: &Path) -> Result<Info, ImageError> {
    let f = open_file(path, true)?;
    let (mut info, layer) = query(Box::new(f), &path.to_string_lossy())?;
    if let Some(uuid) = layer.parent_uuid() {
        let locs = layer.parent_locators();
        info.parent = match FsParentOpener.open_parent(layer.name(), &locs, uuid) {
            Ok((_, name)) => Some(name),
            Err(_) => locs.first().map(|l| l.path.clone()),
        };
    }
    Ok(info)
}

/// Grow a VHD by path.
pub fn resize_path(path: &Path, size: u64) -> Result<(), ImageError> {
    resize(&open_file(path, false)?, size)
}

/// The UUIDs of the image at `path` and of the parents that can be found
/// above it, leaf first. The walk stops at the root, at the first parent
/// that cannot be opened, at a repeated UUID (a loop: that UUID is the
/// last one returned) or at [`tapjail_image::vhd::MAX_CHAIN_DEPTH`].
fn chain_uuids(path: &Path) -> Result<Vec<[u8; 16]>, ImageError> {
    let mut layer = VhdLayer::open(
        Box::new(open_file(path, true)?),
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
            FsParentOpener.open_parent(layer.name(), &layer.parent_locators(), puuid)
        else {
            break;
        };
        let Ok(parent) = VhdLayer::open(pf, &pname, true, VhdOptions::default()) else {
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
    let cf = open_file(child, false)?;
    let child_uuid = tapjail_image::vhd::layout::Metadata::read(&cf)?.footer.uuid();
    if chain_uuids(parent)?.contains(&child_uuid) {
        return Err(ImageError::InvalidArgument(format!(
            "{} cannot be the parent of {}: it is that image or is based on it, \
             which would make a parent loop",
            parent.display(),
            child.display()
        )));
    }
    let (spec, _) = parent_spec(child, parent)?;
    set_parent(&cf, &spec)
}

/// Merge `child` into its parent (found on the filesystem, opened
/// writable, its own chain read-only). A parent smaller than the child is
/// grown first. Returns the parent's path and the bytes copied.
pub fn coalesce_path(
    child: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, u64), ImageError> {
    let cf = open_file(child, true)?;
    let layer = VhdLayer::open(
        Box::new(cf),
        &child.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    let uuid = layer.parent_uuid().ok_or_else(|| {
        ImageError::InvalidArgument(format!("{} is not a differencing image", child.display()))
    })?;
    let (_, pname) = FsParentOpener.open_parent(layer.name(), &layer.parent_locators(), uuid)?;
    let ppath = PathBuf::from(&pname);
    let writable = |r: Result<File, ImageError>| {
        r.map_err(|e| match e {
            ImageError::Io { source, .. } => ImageError::InvalidArgument(format!(
                "{pname}, the parent of {}, cannot be opened for writing, which coalesce \
                 needs (it merges into the parent): {source}",
                child.display()
            )),
            other => other,
        })
    };
    {
        let pf = writable(open_file(&ppath, false))?;
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
    }
    let parent = open_vhd(
        &ppath,
        false,
        VhdOptions {
            sync_metadata: false,
        },
    )?;
    let copied = coalesce_into(&layer, &parent, progress)?;
    Ok((pname, copied))
}

/// Output formats of [`convert_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTarget {
    Raw,
    VhdDynamic { block_size: u32 },
    VhdFixed,
}

/// Open any image by path for reading: VHD (with its chain) or raw.
pub fn open_any(path: &Path) -> Result<Box<dyn Image>, ImageError> {
    let f = open_file(path, true)?;
    Ok(if tapjail_image::vhd::is_vhd(&f)? {
        Box::new(tapjail_image::vhd::chain::open(
            Box::new(f),
            &path.to_string_lossy(),
            true,
            &mut FsParentOpener,
            VhdOptions::default(),
        )?)
    } else {
        Box::new(RawImage::open(Box::new(f), &path.to_string_lossy(), true)?)
    })
}

/// Convert `src` (format detected) into a new file `dst` (which must not
/// exist; a failed conversion removes it again). With `sync` the
/// output is made durable before returning; like `cp` and `qemu-img
/// convert`, it is otherwise left to the page cache.
pub fn convert_path(
    src: &Path,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let image = open_any(src)?;
    write_new_file(dst, |out| {
        convert_into(image.as_ref(), out, dst, target, sync, progress)
    })
}

fn convert_into(
    image: &dyn Image,
    out: File,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = image.virtual_size();
    match target {
        ConvertTarget::Raw => {
            out.set_len(size)
                .map_err(ImageError::io("truncate", size))?;
            copy_image(image, &RawSink(&out), progress)?;
            if sync {
                out.sync_data().map_err(ImageError::io("fsync", 0))?;
            }
            Ok(())
        }
        ConvertTarget::VhdDynamic { .. } | ConvertTarget::VhdFixed => {
            let vsize = size.div_ceil(512) * 512;
            let kind = match target {
                ConvertTarget::VhdDynamic { block_size } => CreateKind::Dynamic { block_size },
                _ => CreateKind::Fixed,
            };
            create(&out, vsize, &kind)?;
            let dst_img = tapjail_image::vhd::chain::open(
                Box::new(out),
                &dst.to_string_lossy(),
                false,
                &mut FsParentOpener,
                VhdOptions {
                    sync_metadata: false,
                },
            )?;
            copy_image(image, &ImageSink(&dst_img), progress)?;
            if sync {
                dst_img.flush()
            } else {
                dst_img.leaf().write_back()
            }
        }
    }
}

/// The path of `target` relative to the directory `from_dir` (both made
/// absolute first), in the `./x` / `../x` form blktap writes.
pub fn relative_path(from_dir: &Path, target: &Path) -> Result<String, ImageError> {
    let abs = |p: &Path| -> Result<PathBuf, ImageError> {
        let p = std::path::absolute(p).map_err(ImageError::io("resolve path", 0))?;
        Ok(normalize(&p))
    };
    let from = abs(from_dir)?;
    let to = abs(target)?;
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..f.len() {
        parts.push("..".into());
    }
    for c in &t[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let rel = parts.join("/");
    Ok(if rel.starts_with("..") {
        rel
    } else {
        format!("./{rel}")
    })
}

/// Lexically remove `.` and `..` components of an absolute path.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_path_same_dir_is_dot_slash() {
        let r = relative_path(Path::new("/a/b"), Path::new("/a/b/base.vhd")).unwrap();
        assert_eq!(r, "./base.vhd");
        let r = relative_path(Path::new("/a/b"), Path::new("/a/c/base.vhd")).unwrap();
        assert_eq!(r, "../c/base.vhd");
        let r = relative_path(Path::new("/a/b/"), Path::new("/a/b/./x/../base.vhd")).unwrap();
        assert_eq!(r, "./base.vhd");
    }

    #[test]
    fn candidates_try_relative_first_against_child_dir() {
        let locs = vec![
            ParentLocator {
                code: "W2ku".into(),
                path: "/abs/base.vhd".into(),
                relative: false,
            },
            ParentLocator {
                code: "W2ru".into(),
                path: "./base.vhd".into(),
                relative: true,
            },
        ];
        let c = FsParentOpener::candidates("/img/child.vhd", &locs);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/img/base.vhd"),
                PathBuf::from("/abs/base.vhd")
            ]
        );
        let c = FsParentOpener::candidates("child.vhd", &locs[1..]);
        assert_eq!(c, vec![PathBuf::from("base.vhd")]);
    }
}
