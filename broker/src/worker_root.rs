//! The one mount namespace every worker joins: an empty, read-only root.
//!
//! A worker used to build its own: `unshare(CLONE_NEWNS)` copies the whole
//! host mount tree (one FUSE mount per attached disk), making it private
//! walks that copy, `pivot_root` walks every thread on the host, and
//! detaching the old root tears the copy down again. With 1000 disks
//! attached that was a third of the worker's confinement and grew with
//! every disk. The broker now builds the namespace once, on first use, and
//! hands it to each worker it spawns on [`ROOT_NS_FD`], with its root
//! directory on [`ROOT_DIR_FD`]; the worker joins it with `setns`
//! (constant time), chroots into that directory (the namespace's own root,
//! where `setns` leaves a process, is the empty root only when the broker
//! runs at the root of its namespace, not in a chroot) and checks that its
//! root is an empty read-only tmpfs before going on.
//!
//! Sharing it gives workers nothing in common: the root is empty and
//! read-only, and a worker can neither mount nor write there (no
//! capabilities, seccomp, landlock). Each worker still gets IPC, UTS and
//! network namespaces of its own, where sharing would give tenants a
//! meeting point (abstract sockets, SysV objects).
//!
//! If the namespace cannot be built (no CAP_SYS_ADMIN, or
//! `TAPJAIL_ROOT_NS=own`, the baseline `bench/control-plane.sh` compares
//! against), workers build their own as before: confinement is the same,
//! only slower.
//!
//! [`ROOT_NS_FD`]: tapjail_common::worker_proto::ROOT_NS_FD
//! [`ROOT_DIR_FD`]: tapjail_common::worker_proto::ROOT_DIR_FD

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The environment variable that, set to `own`, makes every worker build
/// its own empty root (the old way, kept as the benchmark's baseline).
pub const ENV: &str = "TAPJAIL_ROOT_NS";

/// The namespace: an fd on it (`nsfs`) and its inode, which a joined
/// worker's `/proc/PID/ns/mnt` shows.
#[derive(Debug)]
pub struct WorkerRoot {
    ns: OwnedFd,
    dir: OwnedFd,
    inode: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerRootError {
    #[error("unshare(CLONE_NEWNS) on the broker's builder thread: {0}")]
    Unshare(#[source] io::Error),
    #[error("opening the new mount namespace (/proc/thread-self/ns/mnt): {0}")]
    Open(#[source] io::Error),
    #[error("making the empty root: {0}")]
    Mount(#[from] tapjail_common::empty_root::MountError),
    #[error("starting the builder thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("the builder thread panicked")]
    Thread,
}

impl WorkerRoot {
    /// The namespace every worker joins, built on first use; `None` when
    /// it cannot be built or is turned off (logged once): workers then
    /// build their own.
    pub fn shared() -> Option<&'static WorkerRoot> {
        static ROOT: OnceLock<Option<WorkerRoot>> = OnceLock::new();
        ROOT.get_or_init(|| {
            if std::env::var(ENV).is_ok_and(|v| v == "own") {
                return None;
            }
            match WorkerRoot::build() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        "workers will each build their own empty root (slower with many \
                         disks attached): {e}"
                    );
                    None
                }
            }
        })
        .as_ref()
    }

    /// Build a fresh one on a short-lived thread: `unshare(CLONE_NEWNS)`
    /// (which also unshares that thread's root and cwd, never the
    /// broker's), keep an fd on the namespace, make its root empty. The
    /// thread's exit leaves the namespace alive through the fd.
    pub fn build() -> Result<WorkerRoot, WorkerRootError> {
        std::thread::Builder::new()
            .name("worker-root".into())
            .spawn(|| {
                // SAFETY: unshare takes flags only; it affects this thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                    return Err(WorkerRootError::Unshare(io::Error::last_os_error()));
                }
                let ns = File::open("/proc/thread-self/ns/mnt").map_err(WorkerRootError::Open)?;
                tapjail_common::empty_root::enter()?;
                let inode = ns.metadata().map_err(WorkerRootError::Open)?.ino();
                // This thread's root now, which is not the namespace's own
                // root when the broker runs in a chroot: a joining worker
                // chroots here.
                let dir = rustix::fs::open(
                    "/",
                    rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| WorkerRootError::Open(e.into()))?;
                // Well above the fds a spawned child sets up (0-5), so
                // its dup2 onto them never overwrites these first.
                let high = |fd: &dyn AsFd| {
                    rustix::io::fcntl_dupfd_cloexec(fd, 64)
                        .map_err(|e| WorkerRootError::Open(e.into()))
                };
                Ok(WorkerRoot {
                    ns: high(&ns)?,
                    dir: high(&dir)?,
                    inode,
                })
            })
            .map_err(WorkerRootError::Spawn)?
            .join()
            .map_err(|_| WorkerRootError::Thread)?
    }

    /// The namespace's and the root directory's raw fds, for the spawn's
    /// prepared steps.
    pub fn raw_fds(&self) -> [i32; 2] {
        [self.ns.as_raw_fd(), self.dir.as_raw_fd()]
    }

    /// The namespace's inode (what `/proc/PID/ns/mnt` of a member shows).
    pub fn inode(&self) -> u64 {
        self.inode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built as root, the namespace's root is an empty read-only tmpfs and
    /// the broker's own (this test's) root is untouched.
    #[test]
    fn builds_an_empty_read_only_root_without_touching_ours() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
            eprintln!("SKIPPED: needs root");
            return;
        }
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let root = WorkerRoot::build().unwrap();
        assert!(root.raw_fds().iter().all(|&fd| fd >= 64));
        assert_eq!(std::fs::read_link("/proc/self/ns/mnt").unwrap(), ours);
        assert!(std::path::Path::new("/proc/self/status").exists());
        assert_ne!(
            format!("mnt:[{}]", root.inode()),
            ours.display().to_string()
        );
        // Join it in a thread of our own and look around.
        let [fd, dir] = root.raw_fds();
        let seen = std::thread::spawn(move || {
            // SAFETY: flags only; this thread only (CLONE_FS).
            assert_eq!(unsafe { libc::unshare(libc::CLONE_FS) }, 0);
            // SAFETY: setns on an open nsfs fd.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNS) }, 0);
            // SAFETY: fchdir on an open O_PATH directory fd; chroot to it.
            assert_eq!(unsafe { libc::fchdir(dir) }, 0);
            // SAFETY: a NUL-terminated path.
            assert_eq!(unsafe { libc::chroot(c".".as_ptr()) }, 0);
            let entries = std::fs::read_dir("/").unwrap().count();
            let mountinfo = std::fs::metadata("/proc/self/mountinfo").is_ok();
            let write = std::fs::write("/x", b"x").is_err();
            (entries, mountinfo, write)
        })
        .join()
        .unwrap();
        assert_eq!(seen, (0, false, true));
    }
}
