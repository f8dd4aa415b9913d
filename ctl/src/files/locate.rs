//! Following a differencing image's parent locators under the rule of
//! [`super::PARENT_RULE`]: relative only, beneath the child's pinned
//! directory, through no symbolic link.

use super::{check_kind, Paths, PARENT_RULE};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use tapjail_image::vhd::footer::Footer;
use tapjail_image::{Backing, ImageError, ParentLocator};

/// The directory a child's relative locators are resolved in.
pub(super) fn dir_of(child: &str) -> Option<&Path> {
    Path::new(child)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
}

/// Why a locator was not followed, for the message listing them all.
pub(super) fn refused(why: String) -> ImageError {
    ImageError::Parent(why)
}

/// Open the directory `dir` as an `O_PATH` fd, to pin it.
pub(super) fn open_dir(dir: &Path) -> Result<OwnedFd, ImageError> {
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
pub(super) fn peek_uuid(file: &File) -> Option<[u8; 16]> {
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
