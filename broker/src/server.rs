//! The control socket: world-connectable, one thread per client.
//!
//! A client is identified by `SO_PEERCRED` at accept time and by nothing it
//! says. Its first frame must be `Hello`; after that each frame is one
//! request answered by one reply. A frame that cannot be read (malformed,
//! oversized, truncated, carrying fds, or a client that stalls mid-frame)
//! is audited and ends that connection only.

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::records::LockFile;
use crate::sys;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tapjail_common::frame::{self, FrameError, MAX_REQUEST_FRAME};
use tapjail_common::proto::{Reply, Request};

/// How long a client may stay silent (between or inside frames).
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);

/// The bound socket and the lock that makes it ours.
#[derive(Debug)]
pub struct Listener {
    pub listener: UnixListener,
    pub path: PathBuf,
    _lock: LockFile,
}

/// The right to serve a socket path: `PATH.lock`, held for the broker's
/// life. Taken before anything else so a second broker stops at once.
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    lock: LockFile,
}

impl SocketClaim {
    pub fn take(path: &Path) -> anyhow::Result<SocketClaim> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = LockFile::acquire(&lock_path)?
            .ok_or_else(|| anyhow::anyhow!("another tap-broker serves {}", path.display()))?;
        Ok(SocketClaim {
            path: path.to_path_buf(),
            lock,
        })
    }

    /// Bind the socket (mode 0666), replacing a stale one left by a dead
    /// broker. Done last at startup: a client that can connect is served.
    pub fn bind(self) -> anyhow::Result<Listener> {
        let path = self.path;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path)?,
            Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path)?;
        // The policy decides who may do what; anyone may ask.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Listener {
            listener,
            path,
            _lock: self.lock,
        })
    }
}

/// Accept clients forever.
pub fn serve(broker: Arc<Broker>, listener: &UnixListener) {
    let active = Arc::new(AtomicU32::new(0));
    let max = broker.policy.max_clients;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("tap-broker: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= max {
            if let Ok(peer) = sys::peer_cred(&stream) {
                let r = broker.refuse(
                    &peer,
                    None,
                    "max-clients",
                    BrokerError::busy(format!(
                        "tap-broker is serving {max} clients already; try again"
                    )),
                );
                let _ = frame::send_on(&stream, &r, &[]);
            }
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let b = Arc::clone(&broker);
        let a = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                client(&b, &stream);
                a.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn client(broker: &Arc<Broker>, stream: &UnixStream) {
    let Ok(peer) = sys::peer_cred(stream) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
    let _ = stream.set_write_timeout(Some(CLIENT_IDLE));
    let mut greeted = false;
    loop {
        let (req, fds) = match frame::recv_on::<_, Request>(stream, MAX_REQUEST_FRAME) {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(e) => {
                broker.audit_frame_error(&peer, &e);
                let _ = frame::send_on(
                    stream,
                    &BrokerError::invalid(format!("{e}; closing the connection")).reply(),
                    &[],
                );
                return;
            }
        };
        if !fds.is_empty() {
            drop(fds);
            let r = broker.refuse(
                &peer,
                Some(&req),
                "frame",
                BrokerError::invalid(
                    "clients may not send file descriptors; closing the connection",
                ),
            );
            let _ = frame::send_on(stream, &r, &[]);
            return;
        }
        let reply = match (&req, greeted) {
            (Request::Hello { .. }, false) => {
                let r = broker.handle(&peer, &req);
                greeted = matches!(r, Reply::Hello { .. });
                r
            }
            (Request::Hello { .. }, true) => broker.refuse(
                &peer,
                Some(&req),
                "protocol",
                BrokerError::invalid("Hello sent twice"),
            ),
            (_, false) => broker.refuse(
                &peer,
                Some(&req),
                "protocol",
                BrokerError::invalid("the first message must be Hello"),
            ),
            (_, true) => broker.handle(&peer, &req),
        };
        if frame::send_on(stream, &reply, &[]).is_err() || !greeted {
            return;
        }
    }
}
