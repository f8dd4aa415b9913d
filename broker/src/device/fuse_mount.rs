//! The broker's private FUSE mount: one connection on `/dev/fuse`, mounted
//! where no tenant can reach it, and the means to abort it.
//!
//! Preferred is a *detached* mount (`fsopen`/`fsconfig`/`fsmount`, Linux
//! ≥ 5.2): it exists only as an fd the broker holds, appears in no mount
//! table, cannot be reached by any path, and vanishes by itself when the
//! broker closes the fd or dies — nothing is ever left behind in the mount
//! namespace. Where the new mount API is missing, `mount(2)` on a 0700
//! directory under the broker's state dir does the same job, and teardown
//! lazily unmounts it and removes the directory.
//!
//! A connection is aborted through fusectl's `<conn>/abort` file: from
//! `/sys/fs/fuse/connections` when fusectl is mounted there, otherwise from
//! a detached fusectl mount of our own, again leaving no trace.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Errors naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("fuse mount: {step}: {source}{}", kernel_says(.log))]
    Io {
        step: String,
        #[source]
        source: io::Error,
        /// What the kernel logged on the fs-context fd, if anything.
        log: String,
    },
}

impl MountError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            MountError::Io { source, .. } => source.raw_os_error(),
        }
    }
}

fn kernel_says(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {log})")
    }
}

fn err(step: impl Into<String>) -> impl FnOnce(io::Error) -> MountError {
    move |source| MountError::Io {
        step: step.into(),
        source,
        log: String::new(),
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fsopen(fstype: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: fstype is a live NUL-terminated string.
    owned(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC) })
}

fn fsconfig(
    fs: BorrowedFd<'_>,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> io::Result<()> {
    let key = key.map_or(std::ptr::null(), CStr::as_ptr);
    let value = value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: key and value are null or live NUL-terminated strings; aux 0.
    let rc = unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fsmount(fs: BorrowedFd<'_>, attrs: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments.
    owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs,
        )
    })
}

/// Drain the messages the kernel queued on an fs-context fd.
fn context_log(fs: BorrowedFd<'_>) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..8 {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    out.join("; ")
}

/// Build a detached mount of `fstype` with string options `opts` and flag
/// options `flags`.
fn detached(fstype: &str, opts: &[(&str, String)], flags: &[&str]) -> Result<OwnedFd, MountError> {
    let fs =
        fsopen(&cstr(fstype).map_err(err("fsopen"))?).map_err(err(format!("fsopen {fstype}")))?;
    let with_log = |step: String, source: io::Error| MountError::Io {
        step,
        source,
        log: context_log(fs.as_fd()),
    };
    for (k, v) in opts {
        let (k, v) = (
            cstr(k).map_err(err("option"))?,
            cstr(v).map_err(err("option"))?,
        );
        fsconfig(fs.as_fd(), libc::FSCONFIG_SET_STRING, Some(&k), Some(&v))
            .map_err(|e| with_log(format!("fsconfig {}", k.to_string_lossy()), e))?;
    }
    for f in flags {
        let k = cstr(f).map_err(err("option"))?;
        fsconfig(fs.as_fd(), libc::FSCONFIG_SET_FLAG, Some(&k), None)
            .map_err(|e| with_log(format!("fsconfig {f}"), e))?;
    }
    fsconfig(fs.as_fd(), libc::FSCONFIG_CMD_CREATE, None, None)
        .map_err(|e| with_log("fsconfig create".into(), e))?;
    let attrs = libc::MOUNT_ATTR_NOSUID
        | libc::MOUNT_ATTR_NODEV
        | libc::MOUNT_ATTR_NOEXEC
        | libc::MOUNT_ATTR_NOATIME;
    fsmount(fs.as_fd(), attrs).map_err(|e| with_log("fsmount".into(), e))
}

/// Where the filesystem is mounted.
#[derive(Debug)]
enum Kind {
    /// Reachable only through `root`.
    Detached,
    /// Mounted on `dir` (created by us, removed at unmount).
    Dir(PathBuf),
}

/// One mounted single-file FUSE filesystem.
#[derive(Debug)]
pub struct FuseMount {
    kind: Kind,
    /// An `O_PATH` fd of the mount's root directory.
    root: Option<OwnedFd>,
    /// fusectl's name for the connection (the superblock's device number).
    conn: u32,
}

/// Mount options shared by both ways of mounting.
fn options(fuse: BorrowedFd<'_>) -> Vec<(&'static str, String)> {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    vec![
        ("source", "tapjail".into()),
        ("fd", fuse.as_raw_fd().to_string()),
        // S_IFDIR, octal as the option wants it.
        ("rootmode", "40000".into()),
        // Only the broker's own credentials may use the mount: no
        // allow_other. Loop's I/O does no permission checks.
        ("user_id", uid.to_string()),
        ("group_id", gid.to_string()),
    ]
}

impl FuseMount {
    /// Mount the connection `fuse` detached. Returns without waiting for
    /// the server: the kernel sends INIT asynchronously and holds every
    /// other request until it is answered. ENOSYS (see
    /// [`MountError::errno`]) means the kernel predates `fsopen`.
    pub fn detached(fuse: BorrowedFd<'_>) -> Result<Self, MountError> {
        let mut opts = options(fuse);
        opts.push(("subtype", "tapjail".into()));
        let root = detached("fuse", &opts, &["default_permissions"])?;
        Self::finish(Kind::Detached, root)
    }

    /// Mount with `mount(2)` on `dir`, which is created with mode 0700
    /// (its parent should be 0700 and root's too).
    pub fn mount_on(fuse: BorrowedFd<'_>, dir: &Path) -> Result<Self, MountError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(err(format!("create {}", dir.display())))?;
        let data: Vec<String> = options(fuse)
            .into_iter()
            .filter(|(k, _)| *k != "source")
            .map(|(k, v)| format!("{k}={v}"))
            .chain(std::iter::once("default_permissions".to_string()))
            .collect();
        let data = cstr(&data.join(",")).map_err(err("mount options"))?;
        let target = cstr(&dir.to_string_lossy()).map_err(err("mount point"))?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
        // SAFETY: all pointers are live NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tapjail".as_ptr(),
                target.as_ptr(),
                c"fuse.tapjail".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(dir);
            return Err(err(format!("mount on {}", dir.display()))(e));
        }
        let root = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(dir)
            .map(OwnedFd::from);
        match root {
            Ok(root) => Self::finish(Kind::Dir(dir.to_path_buf()), root),
            Err(e) => {
                let _ = lazy_unmount(dir);
                Err(err("open mount root")(e))
            }
        }
    }

    fn finish(kind: Kind, root: OwnedFd) -> Result<Self, MountError> {
        let conn = connection_id(root.as_fd()).map_err(err("statx mount root"))?;
        Ok(FuseMount {
            kind,
            root: Some(root),
            conn,
        })
    }

    /// Take over a mount from a broker that is gone, by its root fd
    /// (and its directory, for a mount(2) fallback mount).
    pub fn adopt(root: OwnedFd, dir: Option<PathBuf>) -> Result<Self, MountError> {
        Self::finish(dir.map_or(Kind::Detached, Kind::Dir), root)
    }

    /// Where a mount(2) fallback mount is (none for a detached one).
    pub fn dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Dir(d) => Some(d),
            Kind::Detached => None,
        }
    }

    /// The mount's root directory, for `openat`.
    pub fn root(&self) -> Option<BorrowedFd<'_>> {
        self.root.as_ref().map(|r| r.as_fd())
    }

    /// fusectl's directory name for this connection.
    pub fn connection(&self) -> u32 {
        self.conn
    }

    /// Whether this is a detached mount (no path at all).
    pub fn is_detached(&self) -> bool {
        matches!(self.kind, Kind::Detached)
    }

    /// Unmount. A detached mount goes away when its last fd is closed (the
    /// superblock itself once the loop device released the file); a
    /// directory mount is detached lazily and its directory removed.
    /// Idempotent.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        drop(self.root.take());
        if let Kind::Dir(dir) = std::mem::replace(&mut self.kind, Kind::Detached) {
            lazy_unmount(&dir)?;
            std::fs::remove_dir(&dir).map_err(err(format!("remove {}", dir.display())))?;
        }
        Ok(())
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// Detach whatever is mounted on `dir` (lazily: a busy mount goes once its
/// users are done); not a mount point is fine.
pub fn lazy_unmount(dir: &Path) -> Result<(), MountError> {
    let target = cstr(&dir.to_string_lossy()).map_err(err("mount point"))?;
    // SAFETY: target is a live NUL-terminated string.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (any more).
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(err(format!("umount {}", dir.display()))(e));
        }
    }
    Ok(())
}

/// The connection's fusectl name: the superblock's device number in the
/// kernel's encoding (major << 20 | minor). `AT_STATX_DONT_SYNC` keeps the
/// stat from asking the (maybe not yet running) FUSE server.
/// fusectl's name of the connection behind `fd` (a file or directory on
/// the mount), without asking the server.
pub fn connection_id(root: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: statx is plain data; zeroed is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: path is a live empty string, stx a live struct statx.
    let rc = unsafe {
        libc::statx(
            root.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut stx,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stx.stx_dev_major << 20) | stx.stx_dev_minor)
}

/// fusectl mounted (detached) once for this process, for hosts that have
/// not mounted it: mounting fusectl fills in a directory for every live
/// FUSE connection, so a mount per abort cost time in proportion to the
/// disks attached (15 ms of each destroy at 1000 disks). Kept, the mount
/// gains and loses connections' directories as they come and go.
fn own_fusectl() -> Result<BorrowedFd<'static>, MountError> {
    static CTL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = CTL.get() {
        return Ok(fd.as_fd());
    }
    // Two first callers may both mount; one mount is kept, the other
    // closed (both see the same single fusectl superblock).
    let _ = CTL.set(detached("fusectl", &[], &[])?);
    CTL.get()
        .map(|fd| fd.as_fd())
        .ok_or_else(|| err("mount fusectl")(io::Error::other("not kept")))
}

/// Abort connection `conn`: every pending and future request fails with
/// ENOTCONN, and readers of the device get ENODEV. The mount stays until
/// unmounted.
pub fn abort_connection(conn: u32) -> Result<(), MountError> {
    let rel = format!("{conn}/abort");
    let host = Path::new("/sys/fs/fuse/connections").join(&rel);
    let file = match File::options().write(true).open(&host) {
        Ok(f) => f,
        Err(_) => {
            // fusectl not mounted on the host: our own, detached.
            let ctl = own_fusectl()?;
            let path = cstr(&rel).map_err(err("abort path"))?;
            // SAFETY: path is a live NUL-terminated string.
            let fd = unsafe {
                libc::openat(
                    ctl.as_raw_fd(),
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                )
            };
            File::from(owned(fd.into()).map_err(err(format!("open fusectl {rel}")))?)
        }
    };
    (&file)
        .write_all(b"1")
        .map_err(err(format!("write fusectl {rel}")))
}

/// Whether connection `conn` still exists and how many requests wait on it
/// (fusectl's `waiting`), for tests and diagnostics.
pub fn waiting(conn: u32) -> Option<u32> {
    let read = |f: &mut File| {
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        s.trim().parse().ok()
    };
    let rel = format!("{conn}/waiting");
    if let Ok(mut f) = File::open(Path::new("/sys/fs/fuse/connections").join(&rel)) {
        return read(&mut f);
    }
    let ctl = own_fusectl().ok()?;
    let path = cstr(&rel).ok()?;
    // SAFETY: path is a live NUL-terminated string.
    let fd = unsafe {
        libc::openat(
            ctl.as_raw_fd(),
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    read(&mut File::from(owned(fd.into()).ok()?))
}
