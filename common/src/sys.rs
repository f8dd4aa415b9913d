//! The one `openat2` wrapper the broker and the standalone monitor share:
//! open a regular file *beneath* a directory fd, never through a symlink,
//! a magic link or a mount point.
//!
//! It allocates nothing and calls only raw syscalls, so the broker can run
//! it in a forked helper process (where only async-signal-safe code may
//! run) with a tenant's credentials and a deadline.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `RESOLVE_NO_XDEV`: no mount point may be crossed (a FUSE or NFS mount
/// planted under an image root is refused, not waited on).
pub const RESOLVE_NO_XDEV: u64 = 0x01;
/// `RESOLVE_NO_MAGICLINKS`: no `/proc/PID/fd/N`-style links.
pub const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
/// `RESOLVE_NO_SYMLINKS`: no symlink anywhere in the path.
pub const RESOLVE_NO_SYMLINKS: u64 = 0x04;
/// `RESOLVE_BENEATH`: the path may not leave the directory (`..`, `/`).
pub const RESOLVE_BENEATH: u64 = 0x08;

/// Everything [`open_beneath`] applies.
pub const BENEATH_STRICT: u64 =
    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;

/// The kernel's `struct open_how`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenHow {
    pub flags: u64,
    pub mode: u64,
    pub resolve: u64,
}

/// Why an open beneath a directory failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeneathError {
    /// The kernel refused (`ELOOP`: a symlink; `EXDEV`: left the directory
    /// or crossed a mount; `ENOENT`, `EACCES`...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// It opened, but is a directory, FIFO, socket or device.
    #[error("not a regular file")]
    NotRegular,
}

impl BeneathError {
    /// The errno, for callers that map it to their own messages.
    pub fn errno(self) -> Option<i32> {
        match self {
            BeneathError::Os(e) => Some(e),
            BeneathError::NotRegular => None,
        }
    }
}

impl BeneathError {
    /// Why `path`, a parent image named relative to `root` (in words, such
    /// as "the image's directory"), was refused, as the rule it broke. The
    /// kernel's own words for ELOOP and EXDEV ("Too many levels of
    /// symbolic links", "Invalid cross-device link") name no rule.
    pub fn parent_refusal(self, path: &str, root: &str) -> String {
        match self {
            BeneathError::Os(libc::ELOOP) => format!(
                "parent path {path} is a symlink or passes through one; images and parents \
                 must be regular files, symlinks are refused"
            ),
            // No symlink is followed, so `..` resolves as written.
            BeneathError::Os(libc::EXDEV) if leaves(path) => {
                format!("parent path {path} leaves {root}")
            }
            BeneathError::Os(libc::EXDEV) => format!(
                "parent path {path} crosses a mount point below {root}; parents must be on \
                 its own filesystem"
            ),
            BeneathError::Os(libc::ENOENT | libc::ENOTDIR) => {
                format!("parent path {path} does not exist")
            }
            BeneathError::NotRegular => format!(
                "parent path {path} is not a regular file (a directory, FIFO, socket or \
                 device); images and parents must be regular files"
            ),
            BeneathError::Os(e) => {
                format!(
                    "parent path {path}: {}",
                    std::io::Error::from_raw_os_error(e)
                )
            }
        }
    }
}

/// Whether `path` names something outside the directory it is relative
/// to: absolute, or more `..` than names before them.
fn leaves(path: &str) -> bool {
    use std::path::Component;
    let mut depth = 0i64;
    for c in std::path::Path::new(path).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return true,
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

impl From<BeneathError> for std::io::Error {
    fn from(e: BeneathError) -> Self {
        match e {
            BeneathError::Os(n) => std::io::Error::from_raw_os_error(n),
            BeneathError::NotRegular => std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    }
}

/// What `fstat` said about an opened file (owner, links, identity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub mode: u32,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `openat2(dir, path, how)`; `dir` may be `None` for `AT_FDCWD`.
pub fn openat2(dir: Option<BorrowedFd<'_>>, path: &CStr, how: &OpenHow) -> Result<OwnedFd, i32> {
    let dirfd: RawFd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `path` is NUL-terminated, `how` points to a live `open_how`
    // whose size we pass; the kernel reads both and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    let fd = RawFd::try_from(fd).map_err(|_| libc::EBADF)?;
    // SAFETY: openat2 just returned this fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat`, without allocating.
pub fn fstat(fd: BorrowedFd<'_>) -> Result<FileStat, i32> {
    // SAFETY: an all-zero `struct stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the duration of the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno());
    }
    Ok(FileStat {
        dev: st.st_dev,
        ino: st.st_ino,
        uid: st.st_uid,
        gid: st.st_gid,
        nlink: st.st_nlink,
        mode: st.st_mode,
    })
}

/// Open `rel` beneath the directory `dir` as a regular file, read-only or
/// read-write, refusing `..`, absolute paths, every symlink and magic link,
/// and any mount point crossed. Opened `O_NONBLOCK` so a FIFO cannot hang
/// the caller, then switched back to blocking. Returns the fd and its
/// `fstat` (so the caller need not stat a file on a filesystem that might
/// not answer).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &CStr,
    writable: bool,
) -> Result<(OwnedFd, FileStat), BeneathError> {
    open_beneath_as(dir, rel, writable, false)
}

/// [`open_beneath`] read-write, creating the file (mode 0600, owned by
/// the caller's fsuid) if it is missing: for files the broker makes in a
/// tenant's root with her credentials, such as CBT logs (unlike
/// [`create_beneath`], an existing file is fine).
pub fn open_or_create_beneath(
    dir: BorrowedFd<'_>,
    rel: &CStr,
) -> Result<(OwnedFd, FileStat), BeneathError> {
    open_beneath_as(dir, rel, true, true)
}

fn open_beneath_as(
    dir: BorrowedFd<'_>,
    rel: &CStr,
    writable: bool,
    create: bool,
) -> Result<(OwnedFd, FileStat), BeneathError> {
    let access = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    let creat = if create { libc::O_CREAT } else { 0 };
    let flags = access | creat | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
    let how = OpenHow {
        flags: u64::try_from(flags).map_err(|_| BeneathError::Os(libc::EINVAL))?,
        mode: if create { 0o600 } else { 0 },
        resolve: BENEATH_STRICT,
    };
    let fd = openat2(Some(dir), rel, &how).map_err(BeneathError::Os)?;
    let st = fstat(fd.as_fd()).map_err(BeneathError::Os)?;
    if st.mode & libc::S_IFMT != libc::S_IFREG {
        return Err(BeneathError::NotRegular);
    }
    // SAFETY: F_SETFL with integer flags on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, access) } != 0 {
        return Err(BeneathError::Os(errno()));
    }
    Ok((fd, st))
}

/// Modification time of an open file, seconds since 1970 (what a VHD
/// child records of its parent), by the raw `fstat` syscall: glibc's
/// `fstat()` is `newfstatat(fd, "", AT_EMPTY_PATH)`, which the worker's
/// seccomp filter does not allow (it takes a path).
pub fn fstat_mtime(fd: BorrowedFd<'_>) -> Result<i64, i32> {
    // SAFETY: an all-zero `struct stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the duration of the call.
    if unsafe { libc::syscall(libc::SYS_fstat, fd.as_raw_fd(), &mut st as *mut libc::stat) } != 0 {
        return Err(errno());
    }
    Ok(st.st_mtime)
}

/// Create `rel` beneath `dir` as a new regular file (`O_CREAT|O_EXCL`,
/// mode 0600, read-write), with the same resolution rules as
/// [`open_beneath`]: a name that exists, even as a dangling symlink, is
/// refused with `EEXIST`.
pub fn create_beneath(
    dir: BorrowedFd<'_>,
    rel: &CStr,
) -> Result<(OwnedFd, FileStat), BeneathError> {
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOCTTY;
    let how = OpenHow {
        flags: u64::try_from(flags).map_err(|_| BeneathError::Os(libc::EINVAL))?,
        mode: 0o600,
        resolve: BENEATH_STRICT,
    };
    let fd = openat2(Some(dir), rel, &how).map_err(BeneathError::Os)?;
    let st = fstat(fd.as_fd()).map_err(BeneathError::Os)?;
    if st.mode & libc::S_IFMT != libc::S_IFREG {
        return Err(BeneathError::NotRegular);
    }
    Ok((fd, st))
}

/// Open the directory `rel` beneath `dir` (`O_PATH`, same resolution
/// rules as [`open_beneath`]; `.` is `dir` itself).
pub fn open_dir_beneath(dir: BorrowedFd<'_>, rel: &CStr) -> Result<OwnedFd, i32> {
    let how = OpenHow {
        flags: u64::try_from(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .map_err(|_| libc::EINVAL)?,
        mode: 0,
        resolve: BENEATH_STRICT,
    };
    openat2(Some(dir), rel, &how)
}

/// Open a directory by path without following any symlink or magic link
/// (`O_PATH`), for use as the `dir` of [`open_beneath`].
pub fn open_dir_nofollow(path: &CStr) -> Result<OwnedFd, i32> {
    let how = OpenHow {
        flags: u64::try_from(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .map_err(|_| libc::EINVAL)?,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    openat2(None, path, &how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn open_beneath_refuses_escapes_links_and_non_files() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("ok.img"), b"x").unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/in.img"), b"y").unwrap();
        std::os::unix::fs::symlink("ok.img", r.join("link")).unwrap();
        let dir = open_dir_nofollow(&CString::new(r.as_os_str().as_bytes()).unwrap()).unwrap();
        let (_, st) = open_beneath(dir.as_fd(), &c("ok.img"), true).unwrap();
        assert_eq!(st.nlink, 1);
        assert!(open_beneath(dir.as_fd(), &c("sub/in.img"), false).is_ok());
        assert_eq!(
            open_beneath(dir.as_fd(), &c("link"), false).unwrap_err(),
            BeneathError::Os(libc::ELOOP)
        );
        assert_eq!(
            open_beneath(dir.as_fd(), &c("../x"), false).unwrap_err(),
            BeneathError::Os(libc::EXDEV)
        );
        assert_eq!(
            open_beneath(dir.as_fd(), &c("/etc/passwd"), false).unwrap_err(),
            BeneathError::Os(libc::EXDEV)
        );
        assert_eq!(
            open_beneath(dir.as_fd(), &c("sub"), true).unwrap_err(),
            BeneathError::Os(libc::EISDIR)
        );
        // A read-only open of a directory succeeds in the kernel; the
        // regular-file check is what refuses it.
        assert_eq!(
            open_beneath(dir.as_fd(), &c("sub"), false).unwrap_err(),
            BeneathError::NotRegular
        );
    }

    #[test]
    fn parent_refusals_state_the_rule_not_the_errno() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::os::unix::fs::symlink("x", r.join("link")).unwrap();
        let dir = open_dir_nofollow(&CString::new(r.as_os_str().as_bytes()).unwrap()).unwrap();
        let why = |p: &str| {
            open_beneath(dir.as_fd(), &c(p), false)
                .unwrap_err()
                .parent_refusal(p, "the image's directory")
        };
        assert_eq!(
            why("link"),
            "parent path link is a symlink or passes through one; images and parents must \
             be regular files, symlinks are refused"
        );
        assert_eq!(
            why("sub/../../x"),
            "parent path sub/../../x leaves the image's directory"
        );
        assert_eq!(
            why("/etc/passwd"),
            "parent path /etc/passwd leaves the image's directory"
        );
        assert_eq!(why("nope"), "parent path nope does not exist");
        assert!(why("sub").contains("is not a regular file"));
        for p in ["link", "sub/../../x", "nope", "sub"] {
            assert!(!why(p).contains("os error"), "{p}: {}", why(p));
        }
        let slash = open_dir_nofollow(&c("/")).unwrap();
        let e = open_beneath(slash.as_fd(), &c("proc/version"), false).unwrap_err();
        assert!(e
            .parent_refusal("proc/version", "/")
            .contains("crosses a mount point below /"));
    }

    #[test]
    fn open_beneath_refuses_to_cross_a_mount_point() {
        // /proc is a mount point under /: reaching it from a directory
        // fd of / crosses a mount.
        let dir = open_dir_nofollow(&c("/")).unwrap();
        assert_eq!(
            open_beneath(dir.as_fd(), &c("proc/version"), false).unwrap_err(),
            BeneathError::Os(libc::EXDEV)
        );
    }
}
