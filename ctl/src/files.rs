//! The offline tools' file handling: opening images by path, creating new
//! files, and finding the parents of a differencing image. The engine
//! (`tapjail-image`) never opens a path; `tap-ctl vhd` does it here.
//!
//! Every operation goes through [`Paths`], so that the same code runs
//! unconfined ([`Local`], as tests and the privsep parent use it) and in
//! the confined image parser, where each file is asked for over a socket
//! ([`crate::privsep`]).
//!
//! # Which parent is followed
//! A differencing image names its parent in locators that come out of the
//! (untrusted) image. Only *relative* locators are followed, only to a
//! file beneath the child's own directory, and through no symbolic link
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): an image
//! cannot make a tool run as root read `/etc/shadow` into a conversion,
//! nor coalesce into a file elsewhere. Absolute locators are ignored. A
//! parent anywhere else is used only when the user names it
//! (`--parent PATH`).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use tapjail_image::raw::RawImage;
use tapjail_image::vhd::check::{check_with_progress, Problem};
use tapjail_image::vhd::coalesce::coalesce_into;
use tapjail_image::vhd::convert::{copy_image, ImageSink, RawSink};
use tapjail_image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_image::vhd::footer::{format_uuid, Footer};
use tapjail_image::vhd::image::VhdImage;
use tapjail_image::vhd::info::{query, Info};
use tapjail_image::vhd::layer::{VhdLayer, VhdOptions};
use tapjail_image::vhd::locator::LocatorCode;
use tapjail_image::vhd::modify::set_parent;
use tapjail_image::vhd::repair::{repair_with_progress, RepairReport};
use tapjail_image::vhd::resize::resize;
use tapjail_image::Image;
use tapjail_image::{Backing, ImageError, ParentLocator, ParentOpener};

/// The rule, said where a parent is refused or not found.
pub const PARENT_RULE: &str = "tap-ctl follows only relative parent locators to a file beneath \
     the image's own directory, through no symbolic link; name the parent with --parent PATH";

/// How the offline tools get at files. Each method is one request the
/// confined parser may make of its unconfined parent.
pub trait Paths {
    /// Open a file named on the command line (read-write if `write`).
    fn open(&mut self, path: &Path, write: bool) -> Result<File, ImageError>;
    /// Create the new file `path` (it must not exist yet).
    fn create(&mut self, path: &Path) -> Result<File, ImageError>;
    /// Remove a file this tool created (after a failed fill).
    fn remove(&mut self, path: &Path);
    /// The parent of `child` named on the command line, if one was.
    fn named_parent(
        &mut self,
        child: &str,
        write: bool,
    ) -> Option<Result<(File, String), ImageError>>;
    /// Open the file one locator of `child` names, under the rule of this
    /// module. Returns the file and the name it was opened under.
    fn locate(
        &mut self,
        child: &str,
        locator: &ParentLocator,
        write: bool,
    ) -> Result<(File, String), ImageError>;
}

/// The directories of the layers opened so far, each pinned (an `O_PATH`
/// fd) when its layer was opened: a layer's parents are looked for in the
/// directory it was opened from, even if someone renames or replaces that
/// directory's path meanwhile.
#[derive(Debug, Default)]
pub struct Dirs(Vec<(String, OwnedFd)>);

impl Dirs {
    /// The pinned directory of the layer opened as `name`.
    pub fn get(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_fd())
    }

    /// Remember `dir` as the directory of `name` (the first one stays).
    pub fn insert(&mut self, name: &str, dir: OwnedFd) {
        if self.get(name).is_none() {
            self.0.push((name.to_string(), dir));
        }
    }
}

/// Direct, unconfined access to the filesystem.
#[derive(Debug, Default)]
pub struct Local {
    /// Parents named by the user: (child name, parent path).
    named: Vec<(String, PathBuf)>,
    dirs: Dirs,
}

impl Local {
    /// Use `parent` as the parent of `leaf` whatever its locators say.
    pub fn with_parent(mut self, leaf: &Path, parent: &Path) -> Self {
        self.named
            .push((leaf.to_string_lossy().into_owned(), parent.to_path_buf()));
        self
    }
}

impl Paths for Local {
    fn open(&mut self, path: &Path, write: bool) -> Result<File, ImageError> {
        let (f, dir) = open_named(path, write)?;
        self.dirs.insert(&path.to_string_lossy(), dir);
        Ok(f)
    }

    fn create(&mut self, path: &Path) -> Result<File, ImageError> {
        create_new_file(path)
    }

    fn remove(&mut self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    fn named_parent(
        &mut self,
        child: &str,
        write: bool,
    ) -> Option<Result<(File, String), ImageError>> {
        let (_, p) = self.named.iter().find(|(c, _)| c == child)?;
        let p = p.clone();
        Some(
            self.open(&p, write)
                .map(|f| (f, p.to_string_lossy().into_owned())),
        )
    }

    fn locate(
        &mut self,
        child: &str,
        locator: &ParentLocator,
        write: bool,
    ) -> Result<(File, String), ImageError> {
        // A child this Local did not open (a caller's own opener) has its
        // directory looked up now.
        let dir = match self.dirs.get(child) {
            Some(d) => d.try_clone_to_owned().map_err(ImageError::io("dup", 0))?,
            None => open_dir(dir_of(child).unwrap_or(Path::new(".")))?,
        };
        let (f, name, pdir) = locate_beneath(dir.as_fd(), dir_of(child), locator, write)?;
        self.dirs.insert(&name, pdir);
        Ok((f, name))
    }
}

/// The [`ParentOpener`] of the offline tools: parents through a [`Paths`].
#[derive(Debug)]
pub struct Opener<'a, P: Paths + ?Sized>(pub &'a mut P);

impl<P: Paths + ?Sized> ParentOpener for Opener<'_, P> {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        let (f, name) = open_parent_via(self.0, child, locators, parent_uuid, false)?;
        Ok((Box::new(f), name))
    }
}

/// [`Opener`] over [`Local`]: parents found on the filesystem, unconfined.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsParentOpener;

impl ParentOpener for FsParentOpener {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        Opener(&mut Local::default()).open_parent(child, locators, parent_uuid)
    }
}

/// The directory a child's relative locators are resolved in.
fn dir_of(child: &str) -> Option<&Path> {
    Path::new(child)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
}

/// Why a locator was not followed, for the message listing them all.
fn refused(why: String) -> ImageError {
    ImageError::Parent(why)
}

/// Open the directory `dir` as an `O_PATH` fd, to pin it.
fn open_dir(dir: &Path) -> Result<OwnedFd, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map(OwnedFd::from)
        .map_err(ImageError::io("open", 0))
}

/// Open the file `locator` names for a layer whose directory is `dir`
/// (known to the user as `dir_name`), if the rule allows it: relative,
/// beneath `dir`, no `..`, no symbolic link. Returns the file, the name
/// it was opened under, and its own directory, pinned.
pub fn locate_beneath(
    dir: BorrowedFd<'_>,
    dir_name: Option<&Path>,
    locator: &ParentLocator,
    write: bool,
) -> Result<(File, String, OwnedFd), ImageError> {
    let rel = Path::new(&locator.path);
    if !locator.relative || rel.is_absolute() {
        return Err(refused(
            "ignored: absolute locators are not followed".into(),
        ));
    }
    let clean: PathBuf = rel
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    if rel.components().any(|c| c == Component::ParentDir) {
        return Err(refused(format!(
            "refused: parent path {} leaves the image's directory (`..`)",
            clean.display()
        )));
    }
    let Some(base) = clean.file_name() else {
        return Err(refused("refused: it names no file".into()));
    };
    let sub = clean
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let shown = clean.display();
    let beneath = |d: BorrowedFd<'_>, p: &Path, flags| {
        crate::sys::openat2_beneath(d, p, flags).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused(format!(
                "refused: parent path {shown} is a symlink or passes through one; images \
                 and parents must be regular files, symlinks are refused"
            )),
            Some(libc::EXDEV) => refused(format!(
                "refused: parent path {shown} crosses a mount point below the image's \
                 directory; parents must be on the image's own filesystem"
            )),
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
                refused(format!("parent path {shown} does not exist"))
            }
            _ => ImageError::Io {
                op: "open",
                offset: 0,
                source: e,
            },
        })
    };
    let pdir = beneath(dir, sub, libc::O_PATH | libc::O_DIRECTORY)?;
    let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
    let f = File::from(beneath(pdir.as_fd(), Path::new(base), flags)?);
    let name = match dir_name {
        Some(d) => d.join(&clean),
        None => clean,
    };
    check_kind(&f, &name)?;
    crate::sys::clear_nonblock(f.as_fd()).map_err(ImageError::io("fcntl", 0))?;
    Ok((f, name.to_string_lossy().into_owned(), pdir))
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

/// Find the parent of `child`: the one named on the command line, else the
/// first locator (under the rule) whose file carries `uuid`, else the
/// first that opens (the engine then reports the UUID mismatch).
pub fn open_parent_via<P: Paths + ?Sized>(
    paths: &mut P,
    child: &str,
    locators: &[ParentLocator],
    uuid: [u8; 16],
    write: bool,
) -> Result<(File, String), ImageError> {
    if let Some(r) = paths.named_parent(child, write) {
        return r;
    }
    let mut tried: Vec<String> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    let mut fallback = None;
    // Relative locators first: the ones that can be followed.
    let ordered = locators
        .iter()
        .filter(|l| l.relative)
        .chain(locators.iter().filter(|l| !l.relative));
    for l in ordered {
        if seen.contains(&l.path.as_str()) {
            continue;
        }
        seen.push(&l.path);
        match paths.locate(child, l, write) {
            Ok((f, name)) => {
                if peek_uuid(&f) == Some(uuid) {
                    return Ok((f, name));
                }
                if fallback.is_none() {
                    fallback = Some((f, name));
                }
            }
            Err(e) => {
                let why = match e {
                    ImageError::Parent(m) | ImageError::InvalidArgument(m) => m,
                    other => other.to_string(),
                };
                tried.push(format!("{} {:?}: {why}", l.code, l.path));
            }
        }
    }
    fallback.ok_or_else(|| {
        ImageError::Parent(format!(
            "no parent of {child} could be opened ({}); {PARENT_RULE}",
            if tried.is_empty() {
                "the image records no parent locator".to_string()
            } else {
                tried.join("; ")
            }
        ))
    })
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
    open_named(path, !read_only).map(|(f, _)| f)
}

/// [`open_file`], returning also the file's directory, pinned: the
/// directory is opened first and the file in it, so both are the ones
/// the path named at the same moment.
pub fn open_named(path: &Path, write: bool) -> Result<(File, OwnedFd), ImageError> {
    let Some(base) = path.file_name() else {
        return Err(not_an_image(path, "directory"));
    };
    let dir = open_dir(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
    let fd = crate::sys::openat2(dir.as_raw_fd(), Path::new(base), flags, 0).map_err(|source| {
        match source.raw_os_error() {
            Some(libc::EISDIR) => not_an_image(path, "directory"),
            _ => ImageError::Io {
                op: "open",
                offset: 0,
                source,
            },
        }
    })?;
    let f = File::from(fd);
    check_kind(&f, path)?;
    // Back to blocking I/O for the image itself.
    crate::sys::clear_nonblock(f.as_fd()).map_err(ImageError::io("fcntl", 0))?;
    Ok((f, dir))
}

/// Refuse anything but a regular file or a block device, by name.
fn check_kind(f: &File, path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::FileTypeExt;
    let t = f.metadata().map_err(ImageError::io("stat", 0))?.file_type();
    if !(t.is_file() || t.is_block_device()) {
        return Err(not_an_image(path, file_kind(t)));
    }
    Ok(())
}

fn not_an_image(path: &Path, kind: &str) -> ImageError {
    ImageError::InvalidArgument(format!(
        "{} is a {kind}, not an image file (a regular file or a block device)",
        path.display()
    ))
}

/// Create the new file `path`, refusing an existing one by name.
pub fn create_new_file(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
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
        })
}

/// Open a VHD and its chain by path, parents found on the filesystem.
pub fn open_vhd(path: &Path, read_only: bool, options: VhdOptions) -> Result<VhdImage, ImageError> {
    open_vhd_in(&mut Local::default(), path, read_only, options)
}

/// Open a VHD and its chain by path, through `paths`.
pub fn open_vhd_in<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    read_only: bool,
    options: VhdOptions,
) -> Result<VhdImage, ImageError> {
    let f = paths.open(path, !read_only)?;
    tapjail_image::vhd::chain::open(
        Box::new(f),
        &path.to_string_lossy(),
        read_only,
        &mut Opener(paths),
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
    write_new_file_in(&mut Local::default(), path, fill)
}

/// [`write_new_file`] through `paths`.
pub fn write_new_file_in<P: Paths + ?Sized, T>(
    paths: &mut P,
    path: &Path,
    fill: impl FnOnce(File) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let f = paths.create(path)?;
    let r = fill(f);
    if r.is_err() {
        paths.remove(path);
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
    parent_spec_in(&mut Local::default(), child, parent)
}

/// [`parent_spec`] through `paths`.
pub fn parent_spec_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
) -> Result<(ParentSpec, u64), ImageError> {
    let pf = paths.open(parent, false)?;
    let mut spec = parent_record(child, parent, &pf)?;
    let layer = VhdLayer::open(
        Box::new(pf),
        &parent.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    spec.uuid = layer.uuid();
    Ok((spec, layer.virtual_size()))
}

/// What a child records about `parent` (open as `pf`) apart from its UUID,
/// which is left null (as for a raw parent): timestamp, name, locators.
pub fn parent_record(child: &Path, parent: &Path, pf: &File) -> Result<ParentSpec, ImageError> {
    let mtime = pf
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| {
            d.as_secs()
                .saturating_sub(tapjail_image::vhd::footer::VHD_EPOCH)
        })
        .unwrap_or(0);
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
    Ok(ParentSpec {
        uuid: [0; 16],
        timestamp: u32::try_from(mtime).unwrap_or(u32::MAX),
        name,
        locators: vec![
            (LocatorCode::W2ru, rel),
            (LocatorCode::W2ku, abs_s.clone()),
            (LocatorCode::MacX, abs_s),
        ],
    })
}

/// Whether `parent` lies outside the directory tree of `child` (its
/// relative locator starts with `..`), so that the offline tools will
/// follow it only when named with `--parent`.
pub fn parent_outside(child: &Path, parent: &Path) -> bool {
    let dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    relative_path(dir, parent).is_ok_and(|r| r.starts_with(".."))
}

/// Refuse making `child` its own parent (both exist and are one file).
pub fn not_own_parent(child: &Path, parent: &Path) -> Result<(), ImageError> {
    if let (Ok(a), Ok(b)) = (child.canonicalize(), parent.canonicalize()) {
        if a == b {
            return Err(ImageError::InvalidArgument(format!(
                "{} cannot be its own parent",
                child.display()
            )));
        }
    }
    Ok(())
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
fn refuse_outgrowing_a_raw_parent<P: Paths + ?Sized>(
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
fn chain_uuids<P: Paths + ?Sized>(paths: &mut P, path: &Path) -> Result<Vec<[u8; 16]>, ImageError> {
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

/// Output formats of [`convert_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTarget {
    Raw,
    VhdDynamic { block_size: u32 },
    VhdFixed,
}

/// What a source image is, as the user says (`-f`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Raw,
    Vhd,
}

/// Open any image by path for reading: VHD (with its chain) or raw,
/// probed without guessing ([`open_any_in`]).
pub fn open_any(path: &Path) -> Result<Box<dyn Image>, ImageError> {
    open_any_in(&mut Local::default(), path, None, false)
}

/// Open an image through `paths` as `format`, or, without one, as a VHD
/// if it shows any sign of being one and as raw only if it shows none: a
/// file that looks like a VHD but does not open as one is refused, never
/// silently taken for raw ([`tapjail_image::vhd::probe`]).
pub fn open_any_in<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    format: Option<SourceFormat>,
    write: bool,
) -> Result<Box<dyn Image>, ImageError> {
    let f = paths.open(path, write)?;
    let name = path.to_string_lossy();
    let vhd = |paths: &mut P, f: File| -> Result<Box<dyn Image>, ImageError> {
        Ok(Box::new(tapjail_image::vhd::chain::open(
            Box::new(f),
            &name,
            !write,
            &mut Opener(paths),
            VhdOptions::default(),
        )?))
    };
    match format {
        Some(SourceFormat::Raw) => Ok(Box::new(RawImage::open(Box::new(f), &name, !write)?)),
        Some(SourceFormat::Vhd) => vhd(paths, f),
        None => match tapjail_image::vhd::probe::vhd_sign(&f)? {
            None => Ok(Box::new(RawImage::open(Box::new(f), &name, !write)?)),
            // A VHD whose footer or header does not parse is not taken
            // for raw; other errors (a missing parent) are the VHD's own.
            Some(sign) => vhd(paths, f).map_err(|e| match e {
                ImageError::Corrupt { .. } | ImageError::Unsupported(_) => {
                    ImageError::InvalidArgument(format!(
                        "{} shows {sign} but does not open as a VHD ({e}); it is not taken \
                     for raw: say `-f vhd` to see only the VHD error, or `-f raw` if it \
                     really is a raw disk image",
                        path.display()
                    ))
                }
                other => other,
            }),
        },
    }
}

/// Convert `src` (format probed) into a new file `dst` (which must not
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
    convert_in(
        &mut Local::default(),
        src,
        None,
        dst,
        target,
        sync,
        progress,
    )
}

/// [`convert_path`] through `paths`, the source's format given or probed.
pub fn convert_in<P: Paths + ?Sized>(
    paths: &mut P,
    src: &Path,
    format: Option<SourceFormat>,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let image = open_any_in(paths, src, format, false)?;
    write_new_file_in(paths, dst, |out| {
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
            // A new dynamic or fixed VHD has no parent to look for.
            let dst_img = tapjail_image::vhd::chain::open(
                Box::new(out),
                &dst.to_string_lossy(),
                false,
                &mut NoParents,
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

/// The opener of an image that has no parent.
struct NoParents;

impl ParentOpener for NoParents {
    fn open_parent(
        &mut self,
        child: &str,
        _: &[ParentLocator],
        _: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        Err(ImageError::Parent(format!("{child} has no parent")))
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
    fn parent_is_looked_for_in_the_directory_the_child_was_opened_from() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        for (d, byte) in [(&a, b'A'), (&b, b'B')] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("base.img"), [byte; 512]).unwrap();
        }
        std::fs::write(a.join("leaf.img"), [0u8; 512]).unwrap();
        let leaf = a.join("leaf.img");
        let mut local = Local::default();
        local.open(&leaf, false).unwrap();
        // The directory's path now leads elsewhere: not followed.
        std::fs::rename(&a, tmp.path().join("a-moved")).unwrap();
        std::os::unix::fs::symlink(&b, &a).unwrap();
        let loc = ParentLocator {
            code: "W2ru".into(),
            path: "./base.img".into(),
            relative: true,
        };
        let (f, name) = local.locate(&leaf.to_string_lossy(), &loc, false).unwrap();
        let mut got = [0u8; 1];
        Backing::read_exact_at(&f, &mut got, 0).unwrap();
        assert_eq!(got, [b'A']);
        assert_eq!(Path::new(&name), a.join("base.img"));
    }
}
