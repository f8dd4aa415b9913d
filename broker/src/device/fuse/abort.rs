//! Cutting short what waits on a wedged or dead worker: aborting the
//! connection through fusectl, and killing the worker where that fails.

use super::FuseBackend;
use crate::device::fuse_mount;
use crate::device::DeviceError;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

impl FuseBackend {
    /// `Some(true)` when the worker has exited, `None` when unknown.
    pub(super) fn worker_exited(&self) -> Option<bool> {
        let pidfd = self.worker.as_ref()?;
        crate::sys::pidfd_exited(pidfd.as_fd(), 0).ok()
    }

    /// Make every request on the connection fail now, so nothing waits on
    /// the worker any more. Escalates to killing the worker when fusectl
    /// is unavailable.
    pub(super) fn abort(&mut self) -> Result<(), DeviceError> {
        self.aborted = true;
        let Some(conn_id) = self.connection() else {
            drop(self.conn.take());
            return Ok(());
        };
        let aborted = fuse_mount::abort_connection(conn_id);
        if aborted.is_err() {
            if let Some(pidfd) = &self.worker {
                kill(pidfd.as_fd());
            }
        }
        // With the worker gone this is the last reference: closing it also
        // aborts the connection.
        drop(self.conn.take());
        aborted.map_err(|e| DeviceError::Failed(e.to_string()))
    }

    /// What a step that may wait on the worker needs to be cut short.
    pub(super) fn deadline(&self) -> Deadline<'_> {
        Deadline {
            timeout: self.opts.timeout,
            conn: self.connection(),
            worker: self.worker.as_ref().map(|p| p.as_fd()),
        }
    }
}

/// A bound on a step that may wait on the worker (it serves the requests
/// the step causes).
#[derive(Debug)]
pub(super) struct Deadline<'a> {
    timeout: Duration,
    /// fusectl's name of the connection, to abort it.
    conn: Option<u32>,
    /// The worker's pidfd, to kill it when aborting is impossible.
    worker: Option<BorrowedFd<'a>>,
}

impl Deadline<'_> {
    /// Run `op`; if it is not done in time, abort the connection (every
    /// request fails at once, so `op` finishes with errors) and report it.
    pub(super) fn run<T: Send>(
        &self,
        what: &str,
        op: impl FnOnce() -> T + Send,
    ) -> (T, Option<DeviceError>) {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let h = s.spawn(move || {
                let v = op();
                let _ = tx.send(());
                v
            });
            let mut late = None;
            if rx.recv_timeout(self.timeout).is_err() {
                late = Some(DeviceError::Failed(format!(
                    "fuse: {what}: worker did not answer within {:?}; connection aborted",
                    self.timeout
                )));
                let aborted = self.conn.map(fuse_mount::abort_connection);
                if !matches!(aborted, Some(Ok(()))) {
                    if let Some(pidfd) = self.worker {
                        kill(pidfd);
                    }
                }
            }
            let v = match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (v, late)
        })
    }
}

/// SIGKILL through a pidfd (no pid reuse race); a worker already gone
/// is fine.
pub(super) fn kill(pidfd: BorrowedFd<'_>) {
    let _ = crate::sys::pidfd_kill(pidfd);
}

pub(super) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    crate::sys::pidfd_open(pid).ok()
}
