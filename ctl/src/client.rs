//! Talking to tap-broker: connect, `Hello`, one request, one reply.
//!
//! Every way this can go wrong says which socket, what happened and what
//! to do: nothing listening, a path that is not a socket, a peer that is
//! not tap-broker (or another version), and a broker that accepts but
//! never answers (tap-ctl gives up after `--timeout`, never hangs).

use anyhow::anyhow;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapjail_common::frame::{self, FrameError, MAX_REPLY_FRAME};
use tapjail_common::proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};

/// The broker refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// `Hello` is sent, its answer not read yet: the first request goes
    /// out behind it, then both answers are read in order. One round trip
    /// fewer per tap-ctl call, and under load each round trip is a wait
    /// for a CPU on both sides. A broker that refuses the `Hello` closes
    /// the connection without reading further, so the request behind it
    /// is never acted on.
    hello_pending: std::cell::Cell<bool>,
}

/// Default for `--timeout`: how long to wait for the broker's answer to a
/// request (opening a long chain, or a worker that must be killed after
/// its own timeout, can take a while).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// How long a live broker may take to answer `Hello` (it does no work for
/// it), so that a hung one is noticed quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `connect(2)` failed, in words that lead to the fix.
fn connect_error(path: &Path, e: &io::Error) -> anyhow::Error {
    let p = path.display();
    let how = "use --socket or TAPJAIL_SOCKET to name tap-broker's socket";
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            let kind = if m.is_dir() {
                "a directory"
            } else if m.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            anyhow!("cannot reach tap-broker: {p} is not a socket ({kind}); {how}")
        }
        _ => {
            match e.kind() {
                io::ErrorKind::NotFound => {
                    anyhow!("cannot reach tap-broker at {p}: no such socket (is tap-broker running? {how})")
                }
                io::ErrorKind::ConnectionRefused => anyhow!(
                "cannot reach tap-broker at {p}: nothing is listening there (tap-broker is not \
                 running, or it died and left its socket behind)"
            ),
                io::ErrorKind::PermissionDenied => anyhow!(
                    "cannot reach tap-broker at {p}: permission denied (the socket or a directory \
                 above it is not accessible to you)"
                ),
                _ => anyhow!("cannot reach tap-broker at {p}: {e} ({how})"),
            }
        }
    }
}

impl Client {
    /// Connect and send `Hello`; its answer is read with the first
    /// request's (see `hello_pending`). Later replies may take `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, &e))?;
        let client = Client {
            stream,
            path: path.to_path_buf(),
            timeout,
            hello_pending: std::cell::Cell::new(true),
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        match client.send(&hello, timeout.min(HELLO_TIMEOUT)) {
            Ok(()) => Ok(client),
            // Refused at once (too many connections): the answer says why.
            Err(SendFailed::Closed(_)) => {
                client.hello_answer()?;
                Err(anyhow!(
                    "{} closed the connection after Hello",
                    path.display()
                ))
            }
            Err(SendFailed::Other(e)) => Err(client.frame_error(&e, HELLO_TIMEOUT, true)),
        }
    }

    /// Read the answer to the `Hello` sent by [`Client::connect`], once.
    fn hello_answer(&self) -> anyhow::Result<()> {
        if !self.hello_pending.replace(false) {
            return Ok(());
        }
        match self.receive(self.timeout.min(HELLO_TIMEOUT), true)? {
            Reply::Hello { .. } => Ok(()),
            other => Err(anyhow!(
                "{} answered Hello with {other:?}: is it tap-broker's socket, and is tap-broker \
                 the same version as tap-ctl?",
                self.path.display()
            )),
        }
    }

    /// Send `req`; a `Reply::Error` becomes a [`Refused`] error.
    pub fn call(&self, req: &Request) -> anyhow::Result<Reply> {
        let span = tracing::debug_span!("request", op = req.verb());
        let _in = span.enter();
        tracing::debug!("sending");
        let reply = self.exchange(req, self.timeout);
        match &reply {
            Ok(Reply::Error { .. }) | Err(_) => tracing::debug!("refused or failed"),
            Ok(_) => tracing::debug!("answered"),
        }
        reply
    }

    fn exchange(&self, req: &Request, wait: Duration) -> anyhow::Result<Reply> {
        match self.send(req, wait) {
            Ok(()) => {}
            // A broker that refuses a connection (too many open) or a
            // Hello answers and closes at once, maybe before our request
            // is written: its answer is still in our socket and says why.
            Err(SendFailed::Closed(e)) => {
                self.hello_answer()?;
                return match self.receive(wait, false) {
                    // Nothing to read either: the broken pipe says most.
                    Err(unread) if unread.downcast_ref::<Refused>().is_none() => {
                        Err(self.frame_error(&FrameError::Io(e), wait, false))
                    }
                    answered => answered,
                };
            }
            Err(SendFailed::Other(e)) => return Err(self.frame_error(&e, wait, false)),
        }
        self.hello_answer()?;
        self.receive(wait, false)
    }

    /// Send one frame within `wait`.
    fn send(&self, req: &Request, wait: Duration) -> Result<(), SendFailed> {
        // Also bounds a send to a broker that stopped reading.
        self.stream
            .set_write_timeout(Some(wait))
            .map_err(|e| SendFailed::Other(FrameError::Io(e)))?;
        match frame::send_on(&self.stream, req, &[]) {
            Ok(()) => Ok(()),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Err(SendFailed::Closed(e))
            }
            Err(e) => Err(SendFailed::Other(e)),
        }
    }

    /// Read one answer within `wait`; a `Reply::Error` becomes [`Refused`].
    fn receive(&self, wait: Duration, hello: bool) -> anyhow::Result<Reply> {
        self.stream.set_read_timeout(Some(wait))?;
        let (reply, fds): (Reply, _) = frame::recv_on(&self.stream, MAX_REPLY_FRAME)
            .map_err(|e| self.frame_error(&e, wait, hello))?;
        drop(fds);
        match reply {
            Reply::Error { kind, message } => Err(Refused { kind, message }.into()),
            r => Ok(r),
        }
    }

    fn frame_error(&self, e: &FrameError, wait: Duration, hello: bool) -> anyhow::Error {
        let p = self.path.display();
        match e {
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if hello {
                    anyhow!(
                        "tap-broker at {p} accepted the connection but did not answer within \
                         {} s: it is hung or overloaded (see its log), or {p} is not \
                         tap-broker's socket",
                        wait.as_secs()
                    )
                } else {
                    anyhow!(
                        "tap-broker at {p} did not answer within {} s (--timeout); the request \
                         may still be carried out: check with `tap-ctl list`",
                        wait.as_secs()
                    )
                }
            }
            FrameError::Decode(_)
            | FrameError::Trailing { .. }
            | FrameError::TooLarge { .. }
            | FrameError::TooManyFds => {
                anyhow!(
                    "the answer from {p} is not understood ({e}): is it tap-broker's socket, \
                     and is tap-broker the same version as tap-ctl?"
                )
            }
            FrameError::Closed | FrameError::Truncated { .. } => anyhow!(
                "tap-broker at {p} closed the connection without answering ({e}); its log or \
                 audit log says why"
            ),
            // Deadline: tap-ctl bounds its waits with socket timeouts.
            FrameError::Io(_) | FrameError::Encode(_) | FrameError::Deadline { .. } => {
                anyhow!("talking to tap-broker at {p}: {e}")
            }
        }
    }
}

/// Why a frame could not be sent.
enum SendFailed {
    /// The broker closed the connection (EPIPE, ECONNRESET).
    Closed(io::Error),
    Other(FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker refused the connection and closed it before our request
    /// went out (it does so when a tenant has too many open): the send
    /// fails with EPIPE, but the refusal is in our socket and is what the
    /// user must see, not "Broken pipe".
    #[test]
    fn refusal_sent_before_the_broker_closed_is_read_after_a_broken_pipe() {
        let (ours, broker) = UnixStream::pair().unwrap();
        let refusal = Reply::Error {
            kind: ErrorKind::Busy,
            message: "tenant alice already has 8 connections open (its max_clients)".into(),
        };
        frame::send_on(&broker, &refusal, &[]).unwrap();
        drop(broker);
        let client = Client {
            stream: ours,
            path: PathBuf::from("/run/tapjail/broker.sock"),
            timeout: Duration::from_secs(10),
            hello_pending: std::cell::Cell::new(false),
        };
        let err = client.call(&list()).unwrap_err();
        let refused = err.downcast_ref::<Refused>().expect("the broker's refusal");
        assert_eq!(refused.kind, ErrorKind::Busy);
        assert!(refused.message.contains("8 connections open"), "{err}");
    }

    fn list() -> Request {
        Request::List {
            pid: None,
            minor: None,
        }
    }

    /// A client connected to a fake broker that `serve`s its one
    /// connection on a thread (joined for its result); the directory
    /// holds the socket.
    fn with_fake_broker<T: Send + 'static>(
        serve: impl FnOnce(UnixStream) -> T + Send + 'static,
    ) -> (Client, std::thread::JoinHandle<T>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let broker = std::thread::spawn(move || serve(listener.accept().unwrap().0));
        let client = Client::connect(&path, Duration::from_secs(10)).unwrap();
        (client, broker, dir)
    }

    /// The request goes out right behind the Hello, before its answer is
    /// read: the fake broker reads both frames before it answers either
    /// (a client that waited for the Hello's answer would leave it
    /// waiting for the second frame until its read timeout).
    #[test]
    fn the_first_request_follows_the_hello_without_waiting_for_its_answer() {
        let (client, broker, _dir) = with_fake_broker(|conn| {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (hello, _) = frame::recv_on::<_, Request>(&conn, 1 << 16).unwrap();
            assert!(matches!(hello, Request::Hello { .. }), "{hello:?}");
            let second = frame::recv_on::<_, Request>(&conn, 1 << 16);
            let pipelined = matches!(second, Ok((Request::List { .. }, _)));
            let hi = Reply::Hello {
                version: PROTOCOL_VERSION,
            };
            frame::send_on(&conn, &hi, &[]).unwrap();
            frame::send_on(&conn, &Reply::List(Vec::new()), &[]).unwrap();
            pipelined
        });
        let reply = client.call(&list()).unwrap();
        assert_eq!(reply, Reply::List(Vec::new()));
        assert!(
            broker.join().unwrap(),
            "the request waited for the Hello's answer"
        );
    }

    /// A broker that refuses the Hello (another protocol version) answers
    /// it and closes: the refusal is what the caller sees, not a reply to
    /// the request queued behind it.
    #[test]
    fn a_refused_hello_is_the_error_of_the_first_request() {
        let (client, broker, _dir) = with_fake_broker(|conn| {
            let _ = frame::recv_on::<_, Request>(&conn, 1 << 16).unwrap();
            let no = Reply::Error {
                kind: ErrorKind::Version,
                message: "tap-ctl speaks protocol 0, this tap-broker speaks 1".into(),
            };
            frame::send_on(&conn, &no, &[]).unwrap();
        });
        let err = client.call(&list()).unwrap_err();
        broker.join().unwrap();
        let refused = err.downcast_ref::<Refused>().expect("the broker's refusal");
        assert_eq!(refused.kind, ErrorKind::Version, "{err}");
    }
}
