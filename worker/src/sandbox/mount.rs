//! Step 5: an empty, read-only root in the worker's own mount namespace.
//!
//! Landlock refuses opens, but not every path syscall (`stat` and friends
//! are outside its reach before ABI 5, and an io_uring op runs in kernel
//! context). So, as Firecracker's jailer does with a chroot, the worker's
//! root becomes an empty tmpfs: mounts made private (nothing propagates to
//! the host), a `tmpfs` mounted read-only over `/proc` (any existing
//! directory would do; this namespace's view of it is all that changes),
//! `pivot_root` into it and the old root detached. Afterwards no host path
//! exists for the worker: `/`, `/etc/shadow`, `/root` give ENOENT whatever
//! else is allowed. The worker never opens paths, so it loses nothing.
//!
//! Runs after [`super::ns::isolate`] entered a new mount namespace, with
//! CAP_SYS_ADMIN (root, before the uid switch).
//!
//! A worker the broker spawns with `--root-ns` joins the broker's one
//! namespace of this shape instead ([`join`]): entering a copy of the
//! host's mount tree and detaching it costs time in proportion to the
//! host's mounts (one per attached FUSE disk), and `pivot_root` walks
//! every thread on the host; `setns` costs the same with 1 disk or 1000.
//! Sharing it gives workers nothing in common to write: the root is an
//! empty read-only tmpfs, and no worker can mount (no capabilities,
//! seccomp).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

pub use tapjail_common::empty_root::MountError;

/// Replace the root with an empty read-only tmpfs in this process's new
/// mount namespace, and detach the old one.
pub fn empty_root() -> Result<(), MountError> {
    tapjail_common::empty_root::enter()
}

/// Join the mount namespace `ns`, make `dir` (a directory in it: the empty
/// root) the root, close both, and check that the root is what
/// [`empty_root`] makes: a read-only tmpfs with nothing in it. The broker
/// made them, but a wrong fd must not leave a worker where host paths are.
///
/// `setns` alone leaves the process at the namespace's own root, which is
/// the empty root only if the broker ran at the root of its namespace; in
/// a chroot (nestvm's guest runs everything in one) it is whatever lies
/// above: hence the chroot into `dir`. What lies above stays out of reach
/// as after a `pivot_root` from a chroot: no path leads there, and the
/// worker drops CAP_SYS_CHROOT and loses `chroot` to seccomp.
pub fn join(ns: OwnedFd, dir: OwnedFd) -> Result<(), MountError> {
    let err = |step: &'static str| MountError {
        step,
        source: io::Error::last_os_error(),
    };
    // SAFETY: setns on an fd we own, with a namespace type.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(err(
            "joining the broker's empty-root mount namespace (setns)",
        ));
    }
    drop(ns);
    // SAFETY: fchdir on an fd we own.
    if unsafe { libc::fchdir(dir.as_raw_fd()) } != 0 {
        return Err(err("fchdir into the empty root"));
    }
    drop(dir);
    // SAFETY: chroot and chdir with NUL-terminated paths.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 || unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(err("chroot into the empty root"));
    }
    let root: &CStr = c"/";
    // SAFETY: a plain C struct, all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs on a NUL-terminated path into a struct we own.
    if unsafe { libc::statfs(root.as_ptr(), &mut st) } != 0 {
        return Err(err("statfs / after joining the empty root"));
    }
    // SAFETY: a plain C struct, all zeros is a valid value.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs on a NUL-terminated path into a struct we own.
    if unsafe { libc::statvfs(root.as_ptr(), &mut vfs) } != 0 {
        return Err(err("statvfs / after joining the empty root"));
    }
    let read_only = vfs.f_flag & libc::ST_RDONLY != 0;
    if st.f_type != libc::TMPFS_MAGIC || !read_only {
        return Err(MountError {
            step: "checking the joined root",
            source: io::Error::other(format!(
                "/ is not a read-only tmpfs (type {:#x}, flags {:#x})",
                st.f_type, vfs.f_flag
            )),
        });
    }
    let entries = std::fs::read_dir("/")
        .map_err(|source| MountError {
            step: "listing the joined root",
            source,
        })?
        .count();
    if entries != 0 {
        return Err(MountError {
            step: "checking the joined root",
            source: io::Error::other(format!("/ is not empty ({entries} entries)")),
        });
    }
    Ok(())
}
