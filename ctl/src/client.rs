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
    /// Connect and exchange `Hello`; later replies may take `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, &e))?;
        let client = Client {
            stream,
            path: path.to_path_buf(),
            timeout,
        };
        let hello_wait = timeout.min(HELLO_TIMEOUT);
        match client.exchange(
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            hello_wait,
        )? {
            Reply::Hello { .. } => Ok(client),
            other => Err(anyhow!(
                "{} answered Hello with {other:?}: is it tap-broker's socket, and is tap-broker \
                 the same version as tap-ctl?",
                path.display()
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
        let hello = matches!(req, Request::Hello { .. });
        // Also bounds a send to a broker that stopped reading.
        self.stream.set_write_timeout(Some(wait))?;
        self.stream.set_read_timeout(Some(wait))?;
        let (reply, fds): (Reply, _) = match frame::send_on(&self.stream, req, &[]) {
            Ok(()) => frame::recv_on(&self.stream, MAX_REPLY_FRAME),
            // A broker that refuses a connection (too many open) answers
            // and closes at once, maybe before our request is written: its
            // answer is still in our socket and says why.
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                frame::recv_on(&self.stream, MAX_REPLY_FRAME).map_err(|_| FrameError::Io(e))
            }
            Err(e) => Err(e),
        }
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
        };
        let err = client
            .call(&Request::List {
                pid: None,
                minor: None,
            })
            .unwrap_err();
        let refused = err.downcast_ref::<Refused>().expect("the broker's refusal");
        assert_eq!(refused.kind, ErrorKind::Busy);
        assert!(refused.message.contains("8 connections open"), "{err}");
    }
}
