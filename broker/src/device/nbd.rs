//! NBD: the "device" is a listening Unix socket in `state_dir/nbd/` that the
//! worker accepts NBD clients on (qemu-img/qemu-io/nbdinfo, or a kernel nbd
//! client pointed at it).
//!
//! The broker keeps its own copy of the listening socket, so a client that
//! reconnects while a dead worker is being replaced waits in the backlog
//! and is then served by the fresh worker (DESIGN.md, "Surviving a dead
//! worker").

use super::factory::DeviceContext;
use super::{DeviceBackend, DeviceError, Prepared};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use tapjail_common::proto::FrontendKind;
use tapjail_common::worker_proto::FrontendSpec;
use tapjail_common::Minor;

#[derive(Debug)]
pub struct NbdBackend {
    minor: Minor,
    socket_path: PathBuf,
    listener: Option<UnixListener>,
}

/// `state_dir/nbd/tapdevN.sock`.
pub fn socket_path(state_dir: &Path, minor: Minor) -> PathBuf {
    state_dir
        .join("nbd")
        .join(format!("{}.sock", minor.device_name()))
}

/// Remove the socket a previous broker left for `minor` (the caller holds
/// the minor's lock, so nobody else is using it).
pub fn cleanup_stale(ctx: &DeviceContext) -> Result<Vec<String>, DeviceError> {
    let path = socket_path(&ctx.state_dir, ctx.minor);
    Ok(if remove_socket(&path)? {
        vec![format!("removed stale NBD socket {}", path.display())]
    } else {
        Vec::new()
    })
}

/// Unlink `path` if it is a socket; Ok(false) if there was nothing.
fn remove_socket(path: &Path) -> Result<bool, DeviceError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| DeviceError::Io {
                step: format!("removing {}", path.display()),
                source,
            })?;
            Ok(true)
        }
        Ok(_) => Err(DeviceError::Failed(format!(
            "{} exists and is not a socket; not touching it",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DeviceError::Io {
            step: format!("inspecting {}", path.display()),
            source,
        }),
    }
}

impl NbdBackend {
    pub fn new(ctx: &DeviceContext) -> Result<Self, DeviceError> {
        Ok(NbdBackend {
            minor: ctx.minor,
            socket_path: socket_path(&ctx.state_dir, ctx.minor),
            listener: None,
        })
    }

    /// Take over the listening socket from a broker that is gone; it must
    /// be bound at this minor's socket path.
    pub fn adopt(ctx: &DeviceContext, fds: &mut super::KeptFds) -> Result<Self, DeviceError> {
        let mut b = NbdBackend::new(ctx)?;
        let l = UnixListener::from(fds.take("nbd: adopting", "listen")?);
        let at = l.local_addr().ok();
        if at.as_ref().and_then(|a| a.as_pathname()) != Some(b.socket_path.as_path()) {
            return Err(DeviceError::Failed(format!(
                "nbd: adopting: the kept socket is not bound at {}",
                b.socket_path.display()
            )));
        }
        b.listener = Some(l);
        Ok(b)
    }

    fn worker_fds(&self) -> Result<Prepared, DeviceError> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| DeviceError::Failed("nbd: socket not prepared".into()))?;
        let dup = listener.try_clone().map_err(|source| DeviceError::Io {
            step: "duplicating the NBD listening socket".into(),
            source,
        })?;
        Ok(Prepared {
            spec: FrontendSpec::Nbd {
                export_name: self.minor.device_name(),
            },
            fds: vec![OwnedFd::from(dup)],
        })
    }
}

impl DeviceBackend for NbdBackend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::Nbd
    }

    fn prepare(&mut self, _size: u64, _read_only: bool) -> Result<Prepared, DeviceError> {
        if self.listener.is_some() {
            return Err(DeviceError::Failed(format!(
                "nbd: {} is already prepared",
                self.minor.device_name()
            )));
        }
        let io = |step: String| move |source| DeviceError::Io { step, source };
        if let Some(dir) = self.socket_path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        remove_socket(&self.socket_path)?;
        let listener = UnixListener::bind(&self.socket_path)
            .map_err(io(format!("binding {}", self.socket_path.display())))?;
        std::fs::set_permissions(&self.socket_path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod {}", self.socket_path.display())))?;
        self.listener = Some(listener);
        self.worker_fds()
    }

    fn activate(&mut self, _worker_pid: u32) -> Result<PathBuf, DeviceError> {
        Ok(self.socket_path.clone())
    }

    fn recover(&mut self) -> Result<Prepared, DeviceError> {
        self.worker_fds()
    }

    fn recovered(&mut self, _worker_pid: u32) -> Result<(), DeviceError> {
        Ok(())
    }

    fn handoff(&self) -> Option<super::HandoffFds<'_>> {
        let l = self.listener.as_ref()?;
        Some((
            super::Handoff {
                kind: "nbd".into(),
                node: self.socket_path.clone(),
                roles: vec!["listen".into()],
                ..Default::default()
            },
            vec![("listen", std::os::fd::AsFd::as_fd(l))],
        ))
    }

    fn teardown(&mut self) -> Result<(), DeviceError> {
        self.listener = None;
        remove_socket(&self.socket_path).map(|_| ())
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn nbd_prepare_serves_socket_and_teardown_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = DeviceContext {
            minor: Minor::new(7).unwrap(),
            state_dir: dir.path().to_path_buf(),
            nbd_kernel_connections: 1,
        };
        let mut b = NbdBackend::new(&ctx).unwrap();
        let p = b.prepare(1 << 20, false).unwrap();
        assert_eq!(
            p.spec,
            FrontendSpec::Nbd {
                export_name: "tapdev7".into()
            }
        );
        let path = b.activate(1).unwrap();
        assert_eq!(path, dir.path().join("nbd/tapdev7.sock"));
        // The worker's copy accepts what clients connect.
        let listener = UnixListener::from(p.fds.into_iter().next().unwrap());
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        assert!(b.prepare(1, false).is_err(), "prepare twice is refused");
        // A fresh worker after a death gets the same socket.
        let r = b.recover().unwrap();
        assert_eq!(r.fds.len(), 1);
        b.teardown().unwrap();
        b.teardown().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn nbd_stale_socket_is_cleaned_but_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = DeviceContext {
            minor: Minor::new(3).unwrap(),
            state_dir: dir.path().to_path_buf(),
            nbd_kernel_connections: 1,
        };
        let path = socket_path(dir.path(), ctx.minor);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        assert_eq!(cleanup_stale(&ctx).unwrap().len(), 1);
        assert!(cleanup_stale(&ctx).unwrap().is_empty());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(cleanup_stale(&ctx).is_err());
        assert!(path.exists());
    }
}
