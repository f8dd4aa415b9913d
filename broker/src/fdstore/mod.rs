//! Keeping the fds a disk needs while no broker runs.
//!
//! The kernel half of a disk lives as long as someone holds its fds: the
//! `/dev/fuse` connection (closing its last fd aborts the connection), the
//! loop device (autoclear: its last close unbinds it), each worker's control
//! socket (a worker whose socket hits EOF exits) and the read end of its
//! stderr pipe (a worker writing into a pipe nobody holds gets EPIPE). The
//! broker puts a dup of each into a store the moment it exists, removes it
//! when it is torn down, and a broker that starts takes them all back.
//!
//! Two stores, the same names:
//! - systemd's FD store (`FDSTORE=1` + `FDNAME=`, handed back as
//!   `LISTEN_FDS`/`LISTEN_FDNAMES`) where `NOTIFY_SOCKET` is set;
//! - otherwise [`holder`]: a tiny process of our own (a mode of the
//!   tap-broker binary) that keeps fds by name behind a root-only socket in
//!   `state_dir` and exits once it holds nothing.

pub mod holder;
pub mod systemd;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

/// Longest fd name (systemd's `FDNAME=` limit).
pub const MAX_NAME: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    #[error("fd holder {path}: {source}")]
    Holder {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("fd holder: {0}")]
    HolderSaid(String),
    #[error("systemd FD store (NOTIFY_SOCKET {socket}): {source}")]
    Systemd {
        socket: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid fd name {0:?}: 1 to 255 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("LISTEN_FDS from systemd: {0}")]
    Listen(String),
}

/// Whether `name` can be stored: systemd refuses `:` and control
/// characters; we keep to a plain alphabet so names never need escaping.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where fds outlive the broker.
#[derive(Debug)]
pub enum FdStore {
    Systemd(systemd::SystemdStore),
    Holder(holder::HolderClient),
    /// Nothing is kept (tests of single pieces; `tap-broker --down`).
    None,
}

impl FdStore {
    /// The store for this broker, with every fd it held from before (a
    /// predecessor's), by name.
    pub fn open(
        state_dir: &Path,
        exe: &Path,
    ) -> Result<(FdStore, Vec<(String, OwnedFd)>), FdStoreError> {
        if let Some(store) = systemd::SystemdStore::from_env() {
            let fds = systemd::take_listen_fds()?;
            return Ok((FdStore::Systemd(store), fds));
        }
        let client = holder::HolderClient::connect_or_spawn(state_dir, exe)?;
        let fds = client.take()?;
        Ok((FdStore::Holder(client), fds))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            FdStore::Systemd(_) => "systemd FD store",
            FdStore::Holder(_) => "fd holder",
            FdStore::None => "none",
        }
    }

    /// Keep a dup of `fd` under `name` (replacing what was there).
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        if !valid_name(name) {
            return Err(FdStoreError::BadName(name.to_string()));
        }
        match self {
            FdStore::Systemd(s) => {
                // systemd keeps every fd sent under a name: drop the old one.
                s.remove(name)?;
                s.put(name, fd)
            }
            FdStore::Holder(h) => h.put(name, fd),
            FdStore::None => Ok(()),
        }
    }

    /// Forget `name` (no error if it was not there).
    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        match self {
            FdStore::Systemd(s) => s.remove(name),
            FdStore::Holder(h) => h.remove(name),
            FdStore::None => Ok(()),
        }
    }
}

/// Names kept in a store for one owner (a worker, a device), removed
/// from the store when this is dropped: whatever path takes the owner
/// down, its fds do not outlive it in the store. A broker that exits on
/// purpose to be restarted leaves without dropping (`process::exit`).
#[derive(Debug)]
pub struct Kept {
    store: std::sync::Arc<FdStore>,
    names: Vec<String>,
}

impl Kept {
    /// Put every `(name, fd)` in `store`; on error, remove what was put.
    pub fn put(
        store: &std::sync::Arc<FdStore>,
        fds: &[(String, BorrowedFd<'_>)],
    ) -> Result<Kept, FdStoreError> {
        let mut kept = Kept {
            store: store.clone(),
            names: Vec::with_capacity(fds.len()),
        };
        for (name, fd) in fds {
            store.put(name, *fd)?;
            kept.names.push(name.clone());
        }
        Ok(kept)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        for n in &self.names {
            if let Err(e) = self.store.remove(n) {
                tracing::warn!("{}: removing {n}: {e}", self.store.kind());
            }
        }
    }
}
