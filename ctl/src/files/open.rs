//! Opening the files a user names: regular files only, with a message
//! that says what else was named; creating new ones without clobbering.

use super::{open_dir, Local, Opener, Paths};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use tapjail_image::vhd::image::VhdImage;
use tapjail_image::vhd::layer::VhdOptions;
use tapjail_image::ImageError;

/// What kind of file `t` is, for "X is a FIFO, not an image file".
pub(super) fn file_kind(t: std::fs::FileType) -> &'static str {
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
pub(super) fn check_kind(f: &File, path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::FileTypeExt;
    let t = f.metadata().map_err(ImageError::io("stat", 0))?.file_type();
    if !(t.is_file() || t.is_block_device()) {
        return Err(not_an_image(path, file_kind(t)));
    }
    Ok(())
}

pub(super) fn not_an_image(path: &Path, kind: &str) -> ImageError {
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
