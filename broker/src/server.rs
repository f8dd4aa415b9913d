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
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapjail_common::frame::{self, Deadline, FrameError, MAX_REQUEST_FRAME};
use tapjail_common::proto::{Reply, Request};
use tapjail_policy::PeerCred;

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
        // Before anything else (and long before `bind`): a path taken by
        // something that is not a socket is a configuration error.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                anyhow::bail!(
                    "{} exists and is not a socket: remove it or set `socket = ...` in the policy",
                    path.display()
                );
            }
        }
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

/// Connections one uid may hold at once, so that nobody (a stranger
/// included: it is refused only once it says Hello) can take every slot.
pub const MAX_CLIENTS_PER_UID: usize = 8;

/// How long a new connection has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections one uid that matches no tenant may hold at once. It is
/// refused everything at Hello, so it never needs more than one (two:
/// the slot of a connection just answered is freed a moment later).
pub const MAX_STRANGER_CLIENTS_PER_UID: usize = 2;

/// The share of `max_clients` that peers matching no tenant may hold
/// together (1/8, at least 1). Without it, a user with a subordinate uid
/// range (a user namespace) could present dozens of uids, hold every slot
/// with silent connections and lock every tenant out.
pub fn stranger_slots(max_clients: u32) -> u32 {
    (max_clients / 8).max(1)
}

/// Live connections, in total, of strangers, per uid and per tenant.
#[derive(Debug, Default)]
struct Slots {
    total: u32,
    strangers: u32,
    per_uid: HashMap<u32, usize>,
    per_tenant: HashMap<String, u32>,
}

impl Slots {
    fn release(&mut self, uid: u32, stranger: bool, tenant: Option<&str>) {
        self.total = self.total.saturating_sub(1);
        self.strangers = self.strangers.saturating_sub(u32::from(stranger));
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
        if let Some(t) = tenant {
            if let Some(n) = self.per_tenant.get_mut(t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_tenant.remove(t);
                }
            }
        }
    }
}

/// When the next frame from a client must have arrived: its Hello within
/// [`HELLO_TIMEOUT`] of connecting, later ones after at most
/// [`CLIENT_IDLE`] of silence; either way the whole frame within
/// `frame_timeout` of its first byte (a client trickling bytes just inside
/// a per-read timeout would otherwise hold its slot for ever).
pub fn client_deadline(connected: Instant, greeted: bool, frame_timeout: Duration) -> Deadline {
    if greeted {
        Deadline {
            first_byte: Some(Instant::now() + CLIENT_IDLE),
            whole_frame: Some(frame_timeout),
            end: None,
        }
    } else {
        let hello_by = connected + HELLO_TIMEOUT;
        Deadline {
            first_byte: Some(hello_by),
            whole_frame: Some(frame_timeout),
            end: Some(hello_by),
        }
    }
}

/// Accept clients forever.
pub fn serve(broker: Arc<Broker>, listener: &UnixListener) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let max = broker.policy.max_clients;
    // Counted denials of a uid that went quiet are written once its window
    // ends, not only when someone else is next refused.
    let b = Arc::clone(&broker);
    let _ = std::thread::Builder::new()
        .name("denial-summary".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            b.flush_denials(false);
            b.settle_lazy();
        });
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(peer) = sys::peer_cred(&stream) else {
            continue;
        };
        let tenant = broker
            .policy
            .tenant_for(peer.uid, peer.gid)
            .map(|t| (t.name.clone(), t.max_clients));
        let stranger = tenant.is_none();
        let refused = {
            let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
            let mine = s.per_uid.get(&peer.uid).copied().unwrap_or(0);
            let per_uid = if stranger {
                MAX_STRANGER_CLIENTS_PER_UID
            } else {
                MAX_CLIENTS_PER_UID
            };
            if s.total >= max {
                Some(format!(
                    "tap-broker is serving {max} clients already; try again"
                ))
            } else if stranger && s.strangers >= stranger_slots(max) {
                Some(format!(
                    "tap-broker is serving {} clients that match no tenant already; try again",
                    stranger_slots(max)
                ))
            } else if let Some((name, cap)) = tenant
                .as_ref()
                .filter(|(name, cap)| s.per_tenant.get(name).copied().unwrap_or(0) >= *cap)
            {
                Some(format!(
                    "tenant {name} already has {cap} connections open (its max_clients)"
                ))
            } else if mine >= per_uid {
                Some(format!(
                    "uid {} already has {} open",
                    peer.uid,
                    if per_uid == 1 {
                        "a connection".to_string()
                    } else {
                        format!("{per_uid} connections")
                    }
                ))
            } else {
                s.total += 1;
                s.strangers += u32::from(stranger);
                *s.per_uid.entry(peer.uid).or_default() += 1;
                if let Some((name, _)) = &tenant {
                    *s.per_tenant.entry(name.clone()).or_default() += 1;
                }
                None
            }
        };
        if let Some(why) = refused {
            // Rate-limited per uid (crate::denials): beyond its budget a
            // refusal is counted, not written at once.
            let r = broker.refuse(&peer, None, "max-clients", BrokerError::busy(why));
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = frame::send_on(&stream, &r, &[]);
            continue;
        }
        let b = Arc::clone(&broker);
        let sl = Arc::clone(&slots);
        let tenant_name = tenant.map(|(name, _)| name);
        let t2 = tenant_name.clone();
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                client(&b, &stream, peer);
                sl.lock().unwrap_or_else(|e| e.into_inner()).release(
                    peer.uid,
                    stranger,
                    t2.as_deref(),
                );
            });
        if spawned.is_err() {
            slots.lock().unwrap_or_else(|e| e.into_inner()).release(
                peer.uid,
                stranger,
                tenant_name.as_deref(),
            );
        }
    }
}

fn client(broker: &Arc<Broker>, stream: &UnixStream, peer: PeerCred) {
    let connected = Instant::now();
    let frame_timeout = Duration::from_secs(u64::from(broker.policy.client_frame_timeout_secs));
    // Replies, too, must be taken whole within the frame timeout.
    let send =
        |reply: &Reply| frame::send_by(stream.as_fd(), reply, &[], Instant::now() + frame_timeout);
    let mut greeted = false;
    loop {
        let deadline = client_deadline(connected, greeted, frame_timeout);
        let (req, fds) = match frame::recv_on_by::<_, Request>(stream, MAX_REQUEST_FRAME, deadline)
        {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(e) => {
                broker.audit_frame_error(&peer, &e);
                let _ = send(&BrokerError::invalid(format!("{e}; closing the connection")).reply());
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
            let _ = send(&r);
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
        if send(&reply).is_err() || !greeted {
            return;
        }
    }
}
