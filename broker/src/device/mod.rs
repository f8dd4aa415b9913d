//! The kernel side of a minor: what the broker creates so that a worker can
//! serve a block device, and tears down again.
//!
//! One [`DeviceBackend`] per attached minor. The broker drives it through a
//! fixed sequence, and on a worker's death through the recovery pair:
//!
//! ```text
//! prepare(size, ro) -> Prepared{spec, fds}  --ToWorker::Serve--> worker
//!                                           <--FromWorker::Serving--
//! activate(pid) -> device node, published as /dev/tapjail/tapdevN
//! ... worker dies ...
//! recover() -> Prepared (fds for the fresh worker)  --Serve--> new worker
//! recovered(new pid)
//! ... close / destroy / broker shutdown ...
//! teardown()   (idempotent; right order even if the worker was killed)
//! ```

pub mod factory;
pub mod fuse;
pub mod fuse_mount;
pub mod kept;
pub mod loop_dev;
pub mod nbd;
pub mod nbd_kernel;
pub mod ublk;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use tapjail_common::proto::FrontendKind;
use tapjail_common::worker_proto::FrontendSpec;

/// What the worker gets for [`tapjail_common::worker_proto::ToWorker::Serve`].
#[derive(Debug)]
pub struct Prepared {
    pub spec: FrontendSpec,
    pub fds: Vec<OwnedFd>,
}

/// Failures creating or removing kernel devices, named by the step.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    /// The host lacks what this frontend needs; the message names the
    /// kernel option or device node (e.g. "ublk: /dev/ublk-control missing
    /// (CONFIG_BLK_DEV_UBLK)").
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// What a broker that starts again needs to take over a live device,
/// besides the fds (kept by role name, see [`DeviceBackend::handoff`]).
/// Written to the minor's root-only record in `state_dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// `fuse`, `nbd` or `ublk`.
    pub kind: String,
    pub size: u64,
    pub read_only: bool,
    /// Workers that took over after a death.
    pub restarts: u32,
    /// What `activate` returned (device node or NBD socket).
    pub node: PathBuf,
    pub loop_number: Option<u32>,
    pub mount_dir: Option<PathBuf>,
    pub ublk_dev_id: Option<u32>,
    /// nbd-kernel: the sockets the device was connected with (a respawn
    /// replaces exactly that many). Absent in records of older brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_connections: Option<u32>,
    /// Roles of the fds kept alongside.
    pub roles: Vec<String>,
}

/// What [`DeviceBackend::handoff`] gives for an active device: its record
/// and the fds a successor must be kept, by role name.
pub type HandoffFds<'a> = (Handoff, Vec<(&'static str, BorrowedFd<'a>)>);

/// Fds a successor gets back, by role; taking a missing one is an error
/// naming it.
#[derive(Debug, Default)]
pub struct KeptFds(pub BTreeMap<String, OwnedFd>);

impl KeptFds {
    pub fn take(&mut self, what: &str, role: &str) -> Result<OwnedFd, DeviceError> {
        self.0.remove(role).ok_or_else(|| {
            DeviceError::Failed(format!(
                "{what}: the {role} fd was not kept while no broker ran"
            ))
        })
    }
}

/// The kernel half of one minor's frontend.
pub trait DeviceBackend: Send + std::fmt::Debug {
    fn kind(&self) -> FrontendKind;

    /// Create the kernel side for a disk of `size` bytes.
    fn prepare(&mut self, size: u64, read_only: bool) -> Result<Prepared, DeviceError>;

    /// The worker reported `Serving`: finish setup and return the device
    /// node (or, for NBD, the socket path) to publish.
    fn activate(&mut self, worker_pid: u32) -> Result<PathBuf, DeviceError>;

    /// The worker died: make the kernel side ready for a fresh worker and
    /// return what that worker must be handed. In-flight I/O must survive.
    fn recover(&mut self) -> Result<Prepared, DeviceError>;

    /// The fresh worker reported `Serving`.
    fn recovered(&mut self, worker_pid: u32) -> Result<(), DeviceError>;

    /// The worker is about to be told to pause or close the image: push
    /// what the kernel still holds for this device (dirty page cache,
    /// queued requests) through the worker while it still serves, so a
    /// paused image is complete and a closed one loses nothing. With
    /// `closing`, the worker stops serving afterwards: the backend must not
    /// wait on it again (FUSE: teardown aborts the connection instead of
    /// flushing into a server that is gone). Default: nothing to push.
    fn sync(&mut self, _closing: bool) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Whether something above the device holds it (a mounted filesystem,
    /// device-mapper): the broker refuses a non-forced close or detach
    /// while it does, since teardown would turn that user's I/O into errors.
    fn in_use(&self) -> bool {
        false
    }

    /// No worker will serve this device again until it is closed (the
    /// respawn limit was hit, respawn is off, or a respawn failed): make
    /// the I/O waiting on it fail now instead of hanging its callers
    /// (blktap fails a dead tapdisk's requests the same way). The device
    /// node stays until `close`/`destroy`, so `tap-ctl list` still shows
    /// the DEAD minor. Default: nothing waits (NBD's socket closes with
    /// the worker).
    fn abandon(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// An active device: what must be kept for a successor broker, the
    /// record and the fds by role. `None` while not active (then a
    /// successor cannot take it over and cleans it up instead).
    fn handoff(&self) -> Option<HandoffFds<'_>> {
        None
    }

    /// This backend was taken over from a broker that is gone; the worker
    /// serving it, if it still lives, is `worker_pid`.
    fn adopted(&mut self, _worker_pid: Option<u32>) {}

    /// Remove everything this backend created, in the right order.
    /// Idempotent, and must work when the worker is already dead.
    fn teardown(&mut self) -> Result<(), DeviceError>;
}
