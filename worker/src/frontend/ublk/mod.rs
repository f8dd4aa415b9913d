//! The ublk frontend, worker side: serve `/dev/ublkcN` (handed over by the
//! broker, never opened here) with one io_uring per hardware queue.
//!
//! The broker has done ADD_DEV and SET_PARAMS; once every queue has
//! fetched its tags ([`UblkFrontend::start`] returns) the worker reports
//! `Serving` and the broker runs START_DEV (or END_USER_RECOVERY when this
//! worker replaces a dead one — the queue side is the same either way).
//! Serving ends when the broker stops the device (the driver aborts every
//! fetch) or when [`UblkServer::stop`] is called.

mod mem;
mod queue;
mod request;
pub mod rings;
mod slow;

pub use slow::{PACED_THREADS, SLOW_THREADS};

use super::{Frontend, FrontendError};
use crate::disk::Disk;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use tapjail_common::ublk_abi::{UBLK_MAX_IO_BUF_BYTES, UBLK_MAX_QUEUE_DEPTH};
use tapjail_common::worker_proto::FrontendSpec;

/// At most this many queues (threads) per disk, whatever the broker says.
pub const MAX_QUEUES: u16 = 16;

/// The queue geometry the broker created the device with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub dev_id: u32,
    pub nr_queues: u16,
    pub queue_depth: u16,
    pub max_io_bytes: u32,
}

impl Geometry {
    /// Take the geometry from a `Serve` spec, refusing values no device
    /// we create can have.
    pub fn from_spec(spec: &FrontendSpec) -> Result<Self, FrontendError> {
        let FrontendSpec::Ublk {
            dev_id,
            nr_queues,
            queue_depth,
            max_io_bytes,
            ..
        } = *spec
        else {
            return Err(FrontendError::Protocol(format!(
                "ublk frontend given a {} spec",
                spec.kind().as_str()
            )));
        };
        let g = Geometry {
            dev_id,
            nr_queues,
            queue_depth,
            max_io_bytes,
        };
        let ok = (1..=MAX_QUEUES).contains(&nr_queues)
            && (1..=UBLK_MAX_QUEUE_DEPTH).contains(&queue_depth)
            && (512..=UBLK_MAX_IO_BUF_BYTES).contains(&max_io_bytes)
            && max_io_bytes & 511 == 0;
        if ok {
            Ok(g)
        } else {
            Err(FrontendError::Protocol(format!(
                "ublk geometry out of range: {g:?}"
            )))
        }
    }

    /// Bytes of request buffers the worker will allocate (and, after
    /// `mlockall`, lock): one `max_io_bytes` buffer per tag per queue.
    pub fn buffer_bytes(&self) -> u64 {
        u64::from(self.nr_queues) * u64::from(self.queue_depth) * u64::from(self.max_io_bytes)
    }
}

/// The ublk frontend: `start` attaches the queues, `serve` waits on them.
#[derive(Debug)]
pub struct UblkFrontend {
    char_dev: Arc<OwnedFd>,
    geometry: Geometry,
    stop: Arc<AtomicBool>,
    server: Option<UblkServer>,
}

/// The running queues of a started frontend.
#[derive(Debug)]
pub struct UblkServer {
    threads: Vec<JoinHandle<()>>,
    done: mpsc::Receiver<Result<(), FrontendError>>,
    stop: Arc<AtomicBool>,
    // Kept open until every queue thread has dropped its ring.
    _char_dev: Arc<OwnedFd>,
}

impl UblkFrontend {
    /// `char_dev` is the broker's `/dev/ublkcN`.
    pub fn new(char_dev: OwnedFd, spec: &FrontendSpec) -> Result<Self, FrontendError> {
        Ok(UblkFrontend {
            char_dev: Arc::new(char_dev),
            geometry: Geometry::from_spec(spec)?,
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Start one thread per queue and return once every tag of every
    /// queue is fetched: the broker may then START_DEV (or end recovery).
    pub fn launch(&self, disk: Arc<Disk>) -> Result<UblkServer, FrontendError> {
        let g = self.geometry;
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(usize::from(g.nr_queues));
        let mut failure = None;
        for q_id in 0..g.nr_queues {
            let fd = self.char_dev.clone();
            let disk = disk.clone();
            let stop2 = stop.clone();
            let ready = ready_tx.clone();
            let done = done_tx.clone();
            let params = queue::QueueParams {
                q_id,
                depth: g.queue_depth,
                max_io_bytes: g.max_io_bytes,
            };
            let spawned = spawn_queue_thread(q_id, move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    queue::run(fd.as_fd(), params, &disk, &stop2, ready)
                }))
                .unwrap_or_else(|_| {
                    Err(FrontendError::Protocol(format!(
                        "ublk queue {q_id} thread panicked"
                    )))
                });
                let _ = done.send(r);
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    failure = Some(FrontendError::Io {
                        step: "spawn a ublk queue thread",
                        source,
                    });
                    break;
                }
            }
        }
        drop(ready_tx);
        if failure.is_none() {
            for _ in 0..threads.len() {
                match ready_rx.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                    Err(_) => {
                        failure = Some(FrontendError::Protocol(
                            "a ublk queue thread ended before it was ready".into(),
                        ));
                        break;
                    }
                }
            }
        }
        let server = UblkServer {
            threads,
            done: done_rx,
            stop,
            _char_dev: self.char_dev.clone(),
        };
        match failure {
            None => Ok(server),
            Some(e) => {
                server.stop();
                let _ = server.join_all();
                Err(e)
            }
        }
    }
}

fn spawn_queue_thread(
    q_id: u16,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    super::spawn_thread(&format!("ublk-q{q_id}"), f)
}

impl UblkServer {
    /// Ask the queues to stop. They hand their tags back to the driver
    /// (which, with user recovery, holds I/O for a successor or until the
    /// broker stops the device) within half a second.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// A handle that stops the queues from another thread.
    pub fn stopper(&self) -> impl FnOnce() + Send + 'static {
        let stop = self.stop.clone();
        move || stop.store(true, Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Wait until every queue has ended: Ok when the driver aborted them
    /// (device stopped) or [`UblkServer::stop`] was called. A queue that
    /// fails while the others run is returned at once, as
    /// [`UblkError::QueueFailed`]: the device is then stuck until a new
    /// server takes over (see [`Frontend::serve`] for UblkFrontend).
    pub fn wait(self) -> Result<(), UblkError> {
        for _ in 0..self.threads.len() {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) if self.stopping() => {
                    tracing::warn!(frontend = "ublk", "while stopping: {e}");
                }
                Ok(Err(e)) => return Err(UblkError::QueueFailed(e)),
                Err(_) => break,
            }
        }
        self.join_all().map_err(UblkError::Stopped)
    }

    fn join_all(self) -> Result<(), FrontendError> {
        for t in self.threads {
            if t.join().is_err() {
                return Err(FrontendError::Protocol(
                    "a ublk queue thread panicked".into(),
                ));
            }
        }
        Ok(())
    }
}

/// How serving ended badly.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// A queue stopped on its own: its requests can only be served again by
    /// a new worker after the broker's recovery.
    #[error("{0}")]
    QueueFailed(FrontendError),
    #[error("{0}")]
    Stopped(FrontendError),
}

impl Frontend for UblkFrontend {
    fn kind(&self) -> &'static str {
        "ublk"
    }

    /// Attach every queue (all tags fetched) before the worker reports
    /// `Serving`, so that the broker's START_DEV / END_USER_RECOVERY finds
    /// the device ready.
    fn start(&mut self, disk: &Arc<Disk>) -> Result<(), FrontendError> {
        if self.server.is_some() {
            return Err(FrontendError::Protocol(
                "ublk queues already started".into(),
            ));
        }
        self.server = Some(self.launch(disk.clone())?);
        Ok(())
    }

    /// Serve until the device is stopped or the stopper is called. A queue
    /// failing on its own leaves requests that no thread of this process
    /// can complete any more; the worker then exits, so that the broker
    /// sees it die and hands the device to a fresh worker (user recovery
    /// re-issues those requests).
    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError> {
        let server = match self.server.take() {
            Some(s) => s,
            None => self.launch(disk)?,
        };
        match server.wait() {
            Ok(()) => Ok(()),
            Err(UblkError::Stopped(e)) => Err(e),
            Err(UblkError::QueueFailed(e)) => {
                tracing::error!(
                    frontend = "ublk",
                    "{e}; exiting so the broker recovers the device"
                );
                std::process::exit(70);
            }
        }
    }

    fn stopper(&self) -> Option<super::Stopper> {
        let stop = self.stop.clone();
        Some(Box::new(move || stop.store(true, Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nr_queues: u16, queue_depth: u16, max_io_bytes: u32) -> FrontendSpec {
        FrontendSpec::Ublk {
            dev_id: 3,
            nr_queues,
            queue_depth,
            max_io_bytes,
            recovering: false,
        }
    }

    #[test]
    fn geometry_accepts_what_the_broker_creates() {
        let g = Geometry::from_spec(&spec(1, 64, 128 * 1024)).unwrap();
        assert_eq!(g.dev_id, 3);
        assert_eq!(g.buffer_bytes(), 8 << 20);
    }

    #[test]
    fn geometry_out_of_range_is_refused() {
        assert!(Geometry::from_spec(&spec(0, 64, 4096)).is_err());
        assert!(Geometry::from_spec(&spec(MAX_QUEUES + 1, 64, 4096)).is_err());
        assert!(Geometry::from_spec(&spec(1, 0, 4096)).is_err());
        assert!(Geometry::from_spec(&spec(1, 4097, 4096)).is_err());
        assert!(Geometry::from_spec(&spec(1, 64, 1000)).is_err());
        assert!(Geometry::from_spec(&spec(1, 64, (32 << 20) + 512)).is_err());
    }

    #[test]
    fn geometry_from_another_frontend_spec_is_refused() {
        let nbd = FrontendSpec::Nbd {
            export_name: "x".into(),
        };
        assert!(Geometry::from_spec(&nbd).is_err());
    }
}
