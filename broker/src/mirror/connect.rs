//! Connecting to a secondary for a confined worker, which has no sockets
//! of its own. A unix socket is reached beneath the directory the policy
//! granted, without following any symlink, magic link or mount point,
//! and only if it is a socket owned by root or one of the tenant's uids;
//! the connect then goes through the opened inode (`/proc/self/fd/N`), so
//! nothing swapped in after the check is reached. TCP goes to the granted
//! address only. Both get I/O timeouts: a secondary that stops answering
//! fails the mirror after [`IO_TIMEOUT`] instead of stalling the guest.

use std::ffi::CString;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use tapjail_common::mirror::MirrorTarget;
use tapjail_common::sys::{self, OpenHow, BENEATH_STRICT};

/// How long one exchange with the secondary may stall.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("opening the granted directory {dir}: {err}")]
    Dir { dir: String, err: std::io::Error },
    #[error("{path}: {err} (it must be a socket directly in {dir}, reached without symlinks)")]
    Open {
        path: String,
        dir: String,
        err: std::io::Error,
    },
    #[error("{path} is not a socket")]
    NotSocket { path: String },
    #[error("{path} belongs to uid {uid}, neither root nor the tenant")]
    Owner { path: String, uid: u32 },
    #[error("connecting to {what}: {err}")]
    Connect { what: String, err: std::io::Error },
}

/// A connected socket to `target`; `dir` is the directory the policy
/// granted for a unix target, `owners` the uids its socket may belong to
/// besides root.
pub fn connect(target: &MirrorTarget, dir: &Path, owners: &[u32]) -> Result<OwnedFd, ConnectError> {
    let fd: OwnedFd = match target {
        MirrorTarget::Unix(path) => {
            let shown = path.display().to_string();
            let dir_shown = dir.display().to_string();
            let cdir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| ConnectError::Dir {
                dir: dir_shown.clone(),
                err: std::io::ErrorKind::InvalidInput.into(),
            })?;
            let dfd = sys::open_dir_nofollow(&cdir).map_err(|e| ConnectError::Dir {
                dir: dir_shown.clone(),
                err: std::io::Error::from_raw_os_error(e),
            })?;
            let name = path.file_name().unwrap_or_default();
            let cname = CString::new(name.as_bytes()).map_err(|_| ConnectError::NotSocket {
                path: shown.clone(),
            })?;
            let how = OpenHow {
                flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
                mode: 0,
                resolve: BENEATH_STRICT,
            };
            let sfd =
                sys::openat2(Some(dfd.as_fd()), &cname, &how).map_err(|e| ConnectError::Open {
                    path: shown.clone(),
                    dir: dir_shown.clone(),
                    err: std::io::Error::from_raw_os_error(e),
                })?;
            let st = sys::fstat(sfd.as_fd()).map_err(|e| ConnectError::Open {
                path: shown.clone(),
                dir: dir_shown,
                err: std::io::Error::from_raw_os_error(e),
            })?;
            if st.mode & libc::S_IFMT != libc::S_IFSOCK {
                return Err(ConnectError::NotSocket { path: shown });
            }
            if st.uid != 0 && !owners.contains(&st.uid) {
                return Err(ConnectError::Owner {
                    path: shown,
                    uid: st.uid,
                });
            }
            let via = format!("/proc/self/fd/{}", sfd.as_raw_fd());
            let s = UnixStream::connect(&via).map_err(|err| ConnectError::Connect {
                what: shown.clone(),
                err,
            })?;
            timeouts(&s, &shown, |s, t| {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            })?;
            s.into()
        }
        MirrorTarget::Tcp(ip, port) => {
            let addr = SocketAddr::from((*ip, *port));
            let what = addr.to_string();
            let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|err| {
                ConnectError::Connect {
                    what: what.clone(),
                    err,
                }
            })?;
            timeouts(&s, &what, |s, t| {
                s.set_nodelay(true)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            })?;
            s.into()
        }
        MirrorTarget::File(..) => {
            return Err(ConnectError::Connect {
                what: target.to_string(),
                err: std::io::Error::other("a file secondary is opened, not connected to"),
            })
        }
    };
    Ok(fd)
}

fn timeouts<S>(
    s: &S,
    what: &str,
    f: impl FnOnce(&S, Option<Duration>) -> std::io::Result<()>,
) -> Result<(), ConnectError> {
    f(s, Some(IO_TIMEOUT)).map_err(|err| ConnectError::Connect {
        what: what.to_string(),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_socket_in_the_granted_dir_connects_and_a_symlink_to_one_does_not() {
        let d = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let _l = UnixListener::bind(d.path().join("s.sock")).unwrap();
        let _o = UnixListener::bind(other.path().join("o.sock")).unwrap();
        let me = rustix::process::getuid().as_raw();
        let t = |p: &Path| MirrorTarget::Unix(p.to_path_buf());
        connect(&t(&d.path().join("s.sock")), d.path(), &[me]).unwrap();
        std::os::unix::fs::symlink(other.path().join("o.sock"), d.path().join("l.sock")).unwrap();
        let e = connect(&t(&d.path().join("l.sock")), d.path(), &[me]).unwrap_err();
        assert!(matches!(e, ConnectError::Open { .. }), "{e}");
        std::fs::write(d.path().join("f"), b"").unwrap();
        let e = connect(&t(&d.path().join("f")), d.path(), &[me]).unwrap_err();
        assert!(matches!(e, ConnectError::NotSocket { .. }), "{e}");
    }

    /// Another user's NBD server in a granted directory is not the
    /// tenant's to write to (as root: chown needs it).
    #[test]
    fn a_socket_of_another_user_is_refused() {
        if rustix::process::getuid().as_raw() != 0 {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let _l = UnixListener::bind(d.path().join("s.sock")).unwrap();
        std::os::unix::fs::chown(d.path().join("s.sock"), Some(4545), Some(4545)).unwrap();
        let t = MirrorTarget::Unix(d.path().join("s.sock"));
        let e = connect(&t, d.path(), &[1000]).unwrap_err();
        assert!(matches!(e, ConnectError::Owner { uid: 4545, .. }), "{e}");
        connect(&t, d.path(), &[4545]).unwrap();
    }
}
