//! Talking to a tapdisk worker over its control socket (starting one is
//! [`crate::supervisor::process`]).
//!
//! Everything a worker sends is untrusted (it parsed a hostile image):
//! frames are size-limited, fds from it are refused, strings are cleaned
//! before they reach a client's terminal or the audit log, every reply
//! has a deadline after which the worker is killed, and an answer that does
//! not fit the request, or a message nobody asked for, gets it killed too
//! (rather than shifting every later answer by one). Why the broker killed a
//! worker is kept for the audit line of its exit.

use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tapjail_common::frame::{self, Deadline, FrameError, MAX_REQUEST_FRAME};
use tapjail_common::worker_proto::{FromWorker, ParentLocator, ToWorker};

pub use tapjail_common::worker_proto::{MAX_CHAIN_DEPTH, MAX_LOCATORS};
/// Operation deadline of a connection nobody configured (the policy's
/// default `operation_timeout_secs`).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest worker-supplied string passed on to clients and the audit log.
pub const MAX_WORKER_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("tapdisk {pid}: {source}")]
    Frame {
        pid: u32,
        #[source]
        source: FrameError,
    },
    #[error("tapdisk {pid} did not answer within {secs} s and was killed")]
    Timeout { pid: u32, secs: u64 },
    #[error(
        "tapdisk {pid} did not finish {what} within the {secs} s operation deadline \
         (operation_timeout_secs) and was killed"
    )]
    OperationTimeout {
        pid: u32,
        what: &'static str,
        secs: u64,
    },
    #[error(
        "timed out: tapdisk {pid} did not answer within the request's -t {secs} s; it was killed \
         (tap-ctl list shows what became of the minor)"
    )]
    RequestTimeout { pid: u32, secs: u32 },
    #[error("tapdisk {pid} broke the protocol: {what}")]
    Protocol { pid: u32, what: String },
    #[error("tapdisk {pid}: {message}")]
    Worker { pid: u32, message: String },
    #[error("tapdisk {pid} is not confined ({what}); it was killed")]
    NotConfined { pid: u32, what: String },
}

/// Replace control characters and cap the length of text that came from a
/// worker, so it cannot forge lines or drive a terminal.
pub fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_WORKER_TEXT)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_WORKER_TEXT {
        out.push('…');
    }
    out
}

pub(crate) fn variant(m: &FromWorker) -> &'static str {
    match m {
        FromWorker::Ready { .. } => "Ready",
        FromWorker::NeedParent { .. } => "NeedParent",
        FromWorker::Opened { .. } => "Opened",
        FromWorker::Serving => "Serving",
        FromWorker::Ok => "Ok",
        FromWorker::Stats(_) => "Stats",
        FromWorker::Error(_) => "Error",
        FromWorker::Resynced { .. } => "Resynced",
        FromWorker::Throttle(_) => "Throttle",
        FromWorker::Snapshotted { .. } => "Snapshotted",
        FromWorker::Cbt(_) => "Cbt",
        FromWorker::Coalesce(_) => "Coalesce",
    }
}

/// A parent request from the worker, already bounded.
#[derive(Debug, Clone)]
pub struct ParentRequest {
    pub child: String,
    pub locators: Vec<ParentLocator>,
}

/// What the worker reported once a chain is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub virtual_size: u64,
    pub chain: Vec<String>,
}

/// The broker's end of one worker's control socket.
#[derive(Debug)]
pub struct WorkerConn {
    sock: UnixStream,
    pid: u32,
    timeout: Duration,
    op_timeout: Duration,
    /// Killed through this when it breaks the protocol or misses a
    /// deadline: its state is then unknown and it may be hostile.
    pidfd: Option<Arc<OwnedFd>>,
    /// Why the broker killed it, for the audit line of its exit.
    killed: Arc<OnceLock<String>>,
}

impl WorkerConn {
    pub fn new(sock: UnixStream, pid: u32, timeout: Duration) -> io::Result<Self> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(WorkerConn {
            sock,
            pid,
            timeout,
            op_timeout: DEFAULT_OP_TIMEOUT,
            pidfd: None,
            killed: Arc::default(),
        })
    }

    /// Kill the worker through `pidfd` when it breaks the protocol.
    pub fn set_pidfd(&mut self, pidfd: Arc<OwnedFd>) {
        self.pidfd = Some(pidfd);
    }

    /// Bound every multi-message exchange (see [`crate::broker::SpawnConfig::op_timeout`]).
    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    /// Set (once) to why the broker killed this worker; the supervisor
    /// puts it in the audit line of the worker's exit.
    pub fn kill_note(&self) -> Arc<OnceLock<String>> {
        self.killed.clone()
    }

    /// Kill the worker for `err`, noting why first.
    fn kill(&self, err: WorkerError) -> WorkerError {
        let _ = self.killed.set(err.to_string());
        if let Some(fd) = &self.pidfd {
            let _ = sys::pidfd_kill(fd.as_fd());
        }
        err
    }

    fn frame_err(&self, e: FrameError) -> WorkerError {
        self.frame_err_within(e, None)
    }

    /// `op`: the operation's name and deadline, when one bounds this read.
    fn frame_err_within(&self, e: FrameError, op: Option<(&'static str, Instant)>) -> WorkerError {
        let err = match e {
            ref e
                if timed_out(e)
                    && crate::xapi::scope::deadline()
                        .is_some_and(|(end, _)| Instant::now() >= end) =>
            {
                let secs = crate::xapi::scope::deadline().map_or(0, |(_, s)| s);
                WorkerError::RequestTimeout {
                    pid: self.pid,
                    secs,
                }
            }
            FrameError::Deadline { .. } => match op {
                Some((what, end)) if Instant::now() >= end => WorkerError::OperationTimeout {
                    pid: self.pid,
                    what,
                    secs: self.op_timeout.as_secs(),
                },
                _ => WorkerError::Timeout {
                    pid: self.pid,
                    secs: self.timeout.as_secs(),
                },
            },
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                WorkerError::Timeout {
                    pid: self.pid,
                    secs: self.timeout.as_secs(),
                }
            }
            other => WorkerError::Frame {
                pid: self.pid,
                source: other,
            },
        };
        self.kill(err)
    }

    pub fn send(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<(), WorkerError> {
        frame::send_on(&self.sock, msg, fds).map_err(|e| self.frame_err(e))
    }

    pub fn recv(&self) -> Result<FromWorker, WorkerError> {
        self.recv_within(None)
    }

    /// Receive one message, all of it within the per-message timeout (not
    /// per read: a worker trickling bytes gains nothing) and, with `op`,
    /// before the operation's deadline.
    fn recv_within(&self, op: Option<(&'static str, Instant)>) -> Result<FromWorker, WorkerError> {
        let mut by = Instant::now() + self.timeout;
        if let Some((_, end)) = op {
            by = by.min(end);
        }
        if let Some((end, _)) = crate::xapi::scope::deadline() {
            by = by.min(end);
        }
        let (msg, fds) =
            frame::recv_on_by::<_, FromWorker>(&self.sock, MAX_REQUEST_FRAME, Deadline::at(by))
                .map_err(|e| self.frame_err_within(e, op))?;
        if !fds.is_empty() {
            return Err(self.violation("sent file descriptors".into()));
        }
        Ok(msg)
    }

    /// Refuse to start an exchange while the worker has already said
    /// something: that would be read as the answer to our request, and
    /// every later answer would be one behind.
    fn ensure_quiet(&self) -> Result<(), WorkerError> {
        if sys::has_queued_data(&self.sock) {
            return Err(self.violation(
                "sent an unsolicited message (an answer to a request never made)".into(),
            ));
        }
        // 0 (closed) or EAGAIN (quiet): the exchange itself reports a close.
        Ok(())
    }

    /// Send and expect the one answer that fits `msg` (`Serving` for
    /// `Serve`, `Stats` for `Stats`, `Ok` otherwise), or `Error`.
    pub fn call(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<FromWorker, WorkerError> {
        self.ensure_quiet()?;
        self.send(msg, fds)?;
        match self.recv()? {
            FromWorker::Error(m) => Err(WorkerError::Worker {
                pid: self.pid,
                message: clean(&m),
            }),
            got if answers(msg, &got) => Ok(got),
            got => {
                Err(self.violation(format!("answered {} to {}", variant(&got), to_variant(msg))))
            }
        }
    }

    /// `call` expecting exactly `want`.
    pub fn expect(
        &self,
        msg: &ToWorker,
        fds: &[BorrowedFd<'_>],
        want: &FromWorker,
    ) -> Result<(), WorkerError> {
        let got = self.call(msg, fds)?;
        if &got == want {
            Ok(())
        } else {
            Err(self.violation(format!("answered {} to {}", variant(&got), to_variant(msg))))
        }
    }

    /// Send `Open` or `Unpause` with the leaf and answer the worker's parent
    /// requests with `resolve` until it reports the chain open.
    pub fn open_chain(
        &self,
        msg: &ToWorker,
        leaf: &File,
        resolve: &mut dyn FnMut(ParentRequest) -> Result<(String, File), String>,
    ) -> Result<Opened, WorkerError> {
        match self.with_parents(msg, &[leaf.as_fd()], resolve)? {
            FromWorker::Opened {
                virtual_size,
                chain,
            } => {
                // Names only (shown and audited), but bounded like the
                // parent requests that made the chain.
                if chain.is_empty() || chain.len() > MAX_CHAIN_DEPTH + 1 {
                    return Err(self.violation(format!(
                        "reported a chain of {} images (1 to {} allowed)",
                        chain.len(),
                        MAX_CHAIN_DEPTH + 1
                    )));
                }
                Ok(Opened {
                    virtual_size,
                    chain: chain.iter().map(|c| clean(c)).collect(),
                })
            }
            other => Err(self.violation(format!("answered {} while opening", variant(&other)))),
        }
    }

    /// Send `msg` with `fds` and answer the worker's parent requests with
    /// `resolve` until it gives another answer, which is returned (an
    /// `Error` as `Err`).
    pub fn with_parents(
        &self,
        msg: &ToWorker,
        fds: &[BorrowedFd<'_>],
        resolve: &mut dyn FnMut(ParentRequest) -> Result<(String, File), String>,
    ) -> Result<FromWorker, WorkerError> {
        let op = ("opening the image chain", Instant::now() + self.op_timeout);
        self.ensure_quiet()?;
        self.send(msg, fds)?;
        for _ in 0..=MAX_CHAIN_DEPTH {
            match self.recv_within(Some(op))? {
                FromWorker::NeedParent {
                    child, locators, ..
                } => {
                    if locators.len() > MAX_LOCATORS {
                        return Err(self.violation(format!(
                            "{} parent locators (limit {MAX_LOCATORS})",
                            locators.len()
                        )));
                    }
                    match resolve(ParentRequest { child, locators }) {
                        Ok((name, file)) => {
                            self.send(&ToWorker::Parent(Ok(name)), &[file.as_fd()])?
                        }
                        Err(why) => self.send(&ToWorker::Parent(Err(why)), &[])?,
                    }
                }
                FromWorker::Error(m) => {
                    return Err(WorkerError::Worker {
                        pid: self.pid,
                        message: clean(&m),
                    })
                }
                other => return Ok(other),
            }
        }
        Err(self.violation(format!("chain deeper than {MAX_CHAIN_DEPTH} images")))
    }
}

impl WorkerConn {
    /// A protocol violation: kill the worker and describe it.
    fn violation(&self, what: String) -> WorkerError {
        self.kill(WorkerError::Protocol {
            pid: self.pid,
            what,
        })
    }
}

/// Whether a read failed for want of time (not for a broken stream).
fn timed_out(e: &FrameError) -> bool {
    match e {
        FrameError::Deadline { .. } => true,
        FrameError::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        _ => false,
    }
}

/// Whether `got` is the (non-error) answer the protocol gives to `msg`.
fn answers(msg: &ToWorker, got: &FromWorker) -> bool {
    matches!(
        (msg, got),
        (ToWorker::Serve(_), FromWorker::Serving)
            | (ToWorker::Stats, FromWorker::Stats(_))
            | (ToWorker::Cbt(_), FromWorker::Cbt(_))
            | (ToWorker::Coalesce(_), FromWorker::Coalesce(_))
            | (
                ToWorker::Limits { .. } | ToWorker::ThrottleStats,
                FromWorker::Throttle(_)
            )
            | (
                ToWorker::Pause
                    | ToWorker::Close
                    | ToWorker::Shutdown
                    | ToWorker::Cache(_)
                    | ToWorker::Mirror { .. }
                    | ToWorker::MirrorSwitch { .. }
                    | ToWorker::Key(_)
                    | ToWorker::SnapshotAbort,
                FromWorker::Ok
            )
            | (ToWorker::SnapshotSwitch, FromWorker::Snapshotted { .. })
    )
}

fn to_variant(m: &ToWorker) -> &'static str {
    match m {
        ToWorker::Open { .. } => "Open",
        ToWorker::Parent(_) => "Parent",
        ToWorker::Serve(_) => "Serve",
        ToWorker::Pause => "Pause",
        ToWorker::Unpause { .. } => "Unpause",
        ToWorker::Close => "Close",
        ToWorker::Stats => "Stats",
        ToWorker::Shutdown => "Shutdown",
        ToWorker::Resync { .. } => "Resync",
        ToWorker::Limits { .. } => "Limits",
        ToWorker::ThrottleStats => "ThrottleStats",
        ToWorker::Cache(_) => "Cache",
        ToWorker::Mirror { .. } => "Mirror",
        ToWorker::MirrorSwitch { .. } => "MirrorSwitch",
        ToWorker::Key(_) => "Key",
        ToWorker::SnapshotPrepare { .. } => "SnapshotPrepare",
        ToWorker::SnapshotSwitch => "SnapshotSwitch",
        ToWorker::SnapshotAbort => "SnapshotAbort",
        ToWorker::Cbt(_) => "Cbt",
        ToWorker::Coalesce(_) => "Coalesce",
    }
}

#[cfg(test)]
mod tests;
