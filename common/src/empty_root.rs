//! An empty, read-only root: a private copy of the mount tree, a `tmpfs`
//! mounted read-only over `/proc` (any existing directory would do; only
//! this namespace's view of it changes), `pivot_root` into it and the old
//! root detached. Afterwards no host path exists in that mount namespace.
//!
//! Shared by the worker (which builds one in its own namespace when
//! started standalone) and the broker (which builds one namespace of this
//! shape at start and has every worker it spawns join it: copying and
//! detaching the host's mount tree costs time in proportion to the host's
//! mounts, one per attached FUSE disk, and `pivot_root` walks every thread
//! on the host; see the broker's `worker_root`).
//!
//! The caller must be in a mount namespace of its own (a fresh
//! `unshare(CLONE_NEWNS)`) with CAP_SYS_ADMIN.

use std::ffi::CStr;
use std::io;

/// Where the new root is mounted before `pivot_root` moves it to `/`.
const STAGE: &CStr = c"/proc";

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct MountError {
    pub step: &'static str,
    #[source]
    pub source: io::Error,
}

fn check(rc: libc::c_long, step: &'static str) -> Result<(), MountError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(MountError {
            step,
            source: io::Error::last_os_error(),
        })
    }
}

/// `mount(2)` with C strings (or null) and flags.
fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    step: &'static str,
) -> Result<(), MountError> {
    let p = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string or null, valid for
    // the duration of the call.
    let rc = unsafe {
        libc::mount(
            p(src),
            target.as_ptr(),
            p(fstype),
            flags,
            p(data).cast::<libc::c_void>(),
        )
    };
    check(rc.into(), step)
}

/// Replace the root with an empty read-only tmpfs and detach the old one.
pub fn enter() -> Result<(), MountError> {
    mount(
        None,
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "making every mount private (mount / MS_REC|MS_PRIVATE)",
    )?;
    mount(
        Some(c"tapjail-empty"),
        STAGE,
        Some(c"tmpfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=4k,mode=0555"),
        "mounting the empty root (tmpfs, read-only)",
    )?;
    chdir(STAGE, "chdir into the empty root")?;
    // pivot_root(".", "."): the old root ends up stacked on the new one at
    // "/", with no directory needed for it (the new root is read-only), and
    // is then detached (the runc/LXC way).
    // SAFETY: two NUL-terminated paths; the syscall takes nothing else.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(rc, "pivot_root into the empty root")?;
    // SAFETY: umount2 with a NUL-terminated path and flags.
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(rc.into(), "detaching the old root (umount2 MNT_DETACH)")?;
    chdir(c"/", "chdir / in the empty root")?;
    Ok(())
}

fn chdir(path: &CStr, step: &'static str) -> Result<(), MountError> {
    // SAFETY: chdir with a NUL-terminated path.
    let rc = unsafe { libc::chdir(path.as_ptr()) };
    check(rc.into(), step)
}
