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
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapjail_common::frame::{self, FrameError, MAX_REQUEST_FRAME};
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

/// Live connections, in total and per uid.
#[derive(Debug, Default)]
struct Slots {
    total: u32,
    per_uid: HashMap<u32, usize>,
}

/// Refused connections of one uid are audited at most once per this
/// interval (with a count of those not written since).
pub const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(1);

/// Rate limit for auditing refused connections. A refusal costs the
/// client one `connect(2)` but the broker an fsync'd audit line written
/// on the accept thread: unlimited, one uid holding its 8 slots and
/// connecting in a loop slowed everyone's requests 40-fold and grew the
/// log by megabytes a minute (filling the disk would stop the broker,
/// which fails closed). Every refusal is still counted in the log.
#[derive(Debug, Default)]
struct RefusalLog {
    /// Per uid: when its last refusal was written, how many were refused
    /// since without a line, and the last peer refused.
    per_uid: HashMap<u32, (Instant, u64, PeerCred)>,
}

impl RefusalLog {
    /// A refusal of `peer` at `now`: `Some(n)` if it is to be audited now
    /// (`n` earlier ones were not), `None` if it is only counted.
    fn note(&mut self, peer: PeerCred, now: Instant) -> Option<u64> {
        match self.per_uid.get_mut(&peer.uid) {
            Some((last, n, p)) if now.duration_since(*last) < REFUSAL_AUDIT_INTERVAL => {
                *n += 1;
                *p = peer;
                None
            }
            Some((last, n, p)) => {
                let unwritten = *n;
                *last = now;
                *n = 0;
                *p = peer;
                Some(unwritten)
            }
            None => {
                self.per_uid.insert(peer.uid, (now, 0, peer));
                Some(0)
            }
        }
    }

    /// Refusals counted but not yet written, of uids quiet for a whole
    /// interval: the last peer and the count, each reported once. Entries
    /// with nothing pending are forgotten then.
    fn overdue(&mut self, now: Instant) -> Vec<(PeerCred, u64)> {
        let mut out = Vec::new();
        self.per_uid.retain(|_, (last, n, peer)| {
            if now.duration_since(*last) < REFUSAL_AUDIT_INTERVAL {
                return true;
            }
            if *n > 0 {
                out.push((*peer, *n));
            }
            false
        });
        out
    }
}

/// Accept clients forever.
pub fn serve(broker: Arc<Broker>, listener: &UnixListener) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let max = broker.policy.max_clients;
    let mut refusals = RefusalLog::default();
    for stream in listener.incoming() {
        for (peer, n) in refusals.overdue(Instant::now()) {
            broker.refuse(
                &peer,
                None,
                "max-clients",
                BrokerError::busy(format!(
                    "{n} more connection(s) of uid {} refused: too many open",
                    peer.uid
                )),
            );
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("tap-broker: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(peer) = sys::peer_cred(&stream) else {
            continue;
        };
        let refused = {
            let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
            let mine = s.per_uid.get(&peer.uid).copied().unwrap_or(0);
            if s.total >= max {
                Some(format!(
                    "tap-broker is serving {max} clients already; try again"
                ))
            } else if mine >= MAX_CLIENTS_PER_UID {
                Some(format!(
                    "uid {} already has {MAX_CLIENTS_PER_UID} connections open",
                    peer.uid
                ))
            } else {
                s.total += 1;
                *s.per_uid.entry(peer.uid).or_default() += 1;
                None
            }
        };
        if let Some(why) = refused {
            let r = match refusals.note(peer, Instant::now()) {
                Some(0) => broker.refuse(&peer, None, "max-clients", BrokerError::busy(why)),
                Some(n) => broker.refuse(
                    &peer,
                    None,
                    "max-clients",
                    BrokerError::busy(format!("{why} ({n} more refused since the last such line)")),
                ),
                // Counted; written with the next line for this uid.
                None => BrokerError::busy(why).reply(),
            };
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = frame::send_on(&stream, &r, &[]);
            continue;
        }
        let b = Arc::clone(&broker);
        let sl = Arc::clone(&slots);
        let release = move |sl: &Mutex<Slots>| {
            let mut s = sl.lock().unwrap_or_else(|e| e.into_inner());
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.per_uid.get_mut(&peer.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.per_uid.remove(&peer.uid);
                }
            }
        };
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                client(&b, &stream, peer);
                release(&sl);
            });
        if spawned.is_err() {
            let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.per_uid.get_mut(&peer.uid) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

fn client(broker: &Arc<Broker>, stream: &UnixStream, peer: PeerCred) {
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
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
                let _ = stream.set_read_timeout(Some(CLIENT_IDLE));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_log_writes_one_line_per_uid_per_interval_and_counts_the_rest() {
        let p = |uid| PeerCred {
            pid: 1,
            uid,
            gid: uid,
        };
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(p(7), t0), Some(0));
        for i in 1..=100 {
            assert_eq!(log.note(p(7), t0 + Duration::from_millis(i)), None);
        }
        // Another uid is not held back by uid 7's flood.
        assert_eq!(log.note(p(8), t0 + Duration::from_millis(5)), Some(0));
        let later = t0 + REFUSAL_AUDIT_INTERVAL + Duration::from_millis(1);
        assert_eq!(log.note(p(7), later), Some(100));
        assert_eq!(log.note(p(7), later + Duration::from_millis(1)), None);
        // A uid that went quiet has its count reported once, then is forgotten.
        let quiet = later + REFUSAL_AUDIT_INTERVAL * 2;
        assert_eq!(log.overdue(quiet), vec![(p(7), 1)]);
        assert!(log.overdue(quiet).is_empty());
        assert!(log.per_uid.is_empty());
        assert_eq!(log.note(p(7), quiet), Some(0));
    }
}
