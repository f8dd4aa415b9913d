//! Step 4 (before the uid switch, which takes the privilege it needs):
//! new IPC, UTS, network and mount namespaces.
//!
//! Defence in depth behind seccomp (which already refuses `socket`) and the
//! ring restrictions: the worker sees no host network interfaces, no host
//! abstract Unix sockets, no host SysV IPC objects and, with [`super::mount`],
//! no host path at all. Sockets it was handed keep working; they belong to
//! the namespace they were made in.
//!
//! A worker started as root (by the broker, or standalone as root) must get
//! every namespace: a failure is an error, and the broker also checks the
//! result from outside. An unprivileged worker cannot unshare and keeps the
//! host's (it has no more reach than the user who started it).

use std::io;

#[derive(Debug, thiserror::Error)]
#[error("unshare(CLONE_NEW{name}): {source}")]
pub struct NsError {
    pub name: &'static str,
    #[source]
    pub source: io::Error,
}

/// Whether this process may (and so must) enter new namespaces.
pub fn privileged() -> bool {
    super::ids::current_uids().1 == 0
}

/// Enter new IPC, UTS, network and (unless `joining_mount_ns`, when the
/// mount namespace is joined instead, see [`super::mount::join`]) mount
/// namespaces; returns the ones entered. As root every one is required;
/// otherwise none is attempted.
pub fn isolate(joining_mount_ns: bool) -> Result<Vec<&'static str>, NsError> {
    let mut entered = Vec::new();
    if !privileged() {
        return Ok(entered);
    }
    let mut flags = vec![
        (libc::CLONE_NEWIPC, "IPC"),
        (libc::CLONE_NEWUTS, "UTS"),
        (libc::CLONE_NEWNET, "NET"),
    ];
    if !joining_mount_ns {
        flags.push((libc::CLONE_NEWNS, "NS"));
    }
    for (flag, name) in flags {
        unshare(flag).map_err(|source| NsError { name, source })?;
        entered.push(name);
    }
    Ok(entered)
}

fn unshare(flag: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only; the process is single-threaded.
    if unsafe { libc::unshare(flag) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
