//! The life of one minor, as a type: what phase it is in, each phase
//! holding exactly what it has. Operations move a minor between phases
//! through a [`crate::lease::Lease`]; `tap-ctl list`'s state bits are
//! derived from the phase.

use crate::device::DeviceBackend;
use crate::error::BrokerError;
use crate::records::{LockFile, MinorRecord};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;
use tapjail_common::proto::{FrontendKind, ImageSpec};
use tapjail_common::state::State;
use tapjail_common::Minor;
use tapjail_policy::ImageGrant;

/// (device, inode) of an image file.
pub type FileId = (u64, u64);

/// An image chain open on a minor.
#[derive(Debug, Clone)]
pub struct OpenImage {
    /// TYPE and normalized path, as `list` shows it.
    pub spec: ImageSpec,
    /// How to open the leaf again (unpause, respawn).
    pub grant: ImageGrant,
    pub read_only: bool,
    pub size: u64,
    /// Leaf first, as the worker named the layers.
    pub chain: Vec<String>,
    /// Every file of the chain, with whether it is open for writing.
    pub files: Vec<(FileId, bool)>,
}

/// An image served on a kernel device.
#[derive(Debug)]
pub struct Served {
    pub image: OpenImage,
    pub device: Box<dyn DeviceBackend>,
    /// `device_dir/tapdevN`, pointing at the backend's node or socket.
    pub link: PathBuf,
}

/// Where a minor is in its life. `tap-ctl list`'s state bits are derived
/// from it ([`Phase::state`]).
#[derive(Debug)]
pub enum Phase {
    /// Allocated, no worker.
    Allocated,
    /// A live worker, no image; `closed` once an image was closed on it.
    Attached { worker: u32, closed: bool },
    /// A live worker serves an image on a device.
    Serving { worker: u32, served: Served },
    /// The worker closed the image for a snapshot; the device waits.
    Paused { worker: u32, served: Served },
    /// The worker died. What it served stays until respawn, close or
    /// destroy.
    Dead {
        worker: u32,
        served: Option<Served>,
        paused: bool,
        closed: bool,
    },
}

impl Phase {
    pub fn worker(&self) -> Option<u32> {
        match self {
            Phase::Allocated => None,
            Phase::Attached { worker, .. }
            | Phase::Serving { worker, .. }
            | Phase::Paused { worker, .. }
            | Phase::Dead { worker, .. } => Some(*worker),
        }
    }

    pub fn served(&self) -> Option<&Served> {
        match self {
            Phase::Serving { served, .. } | Phase::Paused { served, .. } => Some(served),
            Phase::Dead { served, .. } => served.as_ref(),
            _ => None,
        }
    }

    pub fn served_mut(&mut self) -> Option<&mut Served> {
        match self {
            Phase::Serving { served, .. } | Phase::Paused { served, .. } => Some(served),
            Phase::Dead { served, .. } => served.as_mut(),
            _ => None,
        }
    }

    pub fn image(&self) -> Option<&OpenImage> {
        self.served().map(|s| &s.image)
    }

    /// blktap's state bits for this phase.
    pub fn state(&self) -> State {
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        State(match self {
            Phase::Allocated | Phase::Serving { .. } => 0,
            Phase::Attached { closed, .. } => bit(*closed, State::CLOSED),
            Phase::Paused { .. } => State::PAUSED,
            Phase::Dead { paused, closed, .. } => {
                State::DEAD | bit(*paused, State::PAUSED) | bit(*closed, State::CLOSED)
            }
        })
    }

    /// The worker of this phase died: the phase becomes `Dead`, keeping
    /// what it served.
    pub fn into_dead(self) -> Phase {
        match self {
            Phase::Allocated => Phase::Allocated,
            Phase::Attached { worker, closed } => Phase::Dead {
                worker,
                served: None,
                paused: false,
                closed,
            },
            Phase::Serving { worker, served } => Phase::Dead {
                worker,
                served: Some(served),
                paused: false,
                closed: false,
            },
            Phase::Paused { worker, served } => Phase::Dead {
                worker,
                served: Some(served),
                paused: true,
                closed: false,
            },
            dead @ Phase::Dead { .. } => dead,
        }
    }

    /// The one respawn condition: a dead worker was serving an image that
    /// is not paused (a paused image is reopened by unpause, not respawn).
    pub fn wants_respawn(&self) -> bool {
        matches!(
            self,
            Phase::Dead {
                served: Some(_),
                paused: false,
                ..
            }
        )
    }

    fn shown(&self) -> Shown {
        let served = self.served();
        Shown {
            worker: self.worker(),
            state: self.state(),
            image: served.map(|s| s.image.spec.clone()),
            read_only: served.is_some_and(|s| s.image.read_only),
            frontend: served.map(|s| s.device.kind()),
            link: served.map(|s| s.link.clone()),
        }
    }
}

/// What `list` and the lock-file record show of a minor.
#[derive(Debug, Clone)]
pub struct Shown {
    pub worker: Option<u32>,
    pub state: State,
    pub image: Option<ImageSpec>,
    pub read_only: bool,
    pub frontend: Option<FrontendKind>,
    pub link: Option<PathBuf>,
}

/// A minor's phase, or the operation holding it.
#[derive(Debug)]
enum Slot {
    Idle(Phase),
    Leased { op: &'static str, shown: Shown },
}

/// An allocated minor.
#[derive(Debug)]
pub struct Disk {
    pub minor: Minor,
    pub owner: String,
    lock: LockFile,
    slot: Slot,
    pub restarts: u32,
    /// Recent unexpected worker deaths, for the respawn limit.
    pub deaths: VecDeque<Instant>,
    /// This disk's own I/O limits, set at runtime by `tap-ctl throttle
    /// -m`; `None`: its tenant's `disk_io` (see `crate::qos`).
    pub io: Option<tapjail_common::qos::IoLimits>,
    /// Its file secondary, on record for a successor (`crate::mirror::record`).
    pub secondary: Option<crate::mirror::record::FileRecord>,
}

impl Disk {
    pub fn new(minor: Minor, owner: String, lock: LockFile) -> Disk {
        let mut d = Disk {
            minor,
            owner,
            lock,
            slot: Slot::Idle(Phase::Allocated),
            restarts: 0,
            deaths: VecDeque::new(),
            io: None,
            secondary: None,
        };
        d.persist();
        d
    }

    /// The phase, unless an operation holds the minor.
    pub fn phase(&self) -> Result<&Phase, BrokerError> {
        match &self.slot {
            Slot::Idle(p) => Ok(p),
            Slot::Leased { op, .. } => Err(self.busy(op)),
        }
    }

    /// The phase to change in place (operations done under the table lock).
    pub fn phase_mut(&mut self) -> Result<&mut Phase, BrokerError> {
        match &mut self.slot {
            Slot::Idle(p) => Ok(p),
            Slot::Leased { op, .. } => Err(busy(self.minor, op)),
        }
    }

    fn busy(&self, op: &str) -> BrokerError {
        busy(self.minor, op)
    }

    /// Hand the phase to an operation ([`crate::lease::Lease`]); `list`
    /// shows the minor as it was until the phase is settled back.
    pub(crate) fn lease_out(&mut self, op: &'static str) -> Result<Phase, BrokerError> {
        self.phase()?;
        let shown = self.shown();
        match std::mem::replace(&mut self.slot, Slot::Leased { op, shown }) {
            Slot::Idle(phase) => Ok(phase),
            leased @ Slot::Leased { .. } => {
                self.slot = leased;
                Err(self.busy(op))
            }
        }
    }

    /// Give a discarded lease's phase back so that `release` frees it.
    pub(crate) fn restore_for_release(&mut self, phase: Phase) {
        self.slot = Slot::Idle(phase);
    }

    pub fn is_leased(&self) -> bool {
        matches!(self.slot, Slot::Leased { .. })
    }

    pub fn shown(&self) -> Shown {
        match &self.slot {
            Slot::Idle(p) => p.shown(),
            Slot::Leased { shown, .. } => shown.clone(),
        }
    }

    /// Put `phase` in, as `Dead` if its worker has exited unasked (the
    /// supervisor saw the exit while the minor was leased), and save the
    /// record.
    pub(crate) fn settle(&mut self, phase: Phase, worker_died: bool) {
        let phase = if worker_died {
            phase.into_dead()
        } else {
            phase
        };
        self.slot = Slot::Idle(phase);
        self.persist();
    }

    pub fn record(&self) -> MinorRecord {
        let s = self.shown();
        MinorRecord {
            minor: self.minor.get(),
            owner: self.owner.clone(),
            worker: s.worker,
            image: s.image.map(|i| i.to_string()),
            frontend: s.frontend.map(|f| f.as_str().to_string()),
            link: s.link,
            state: s.state.0,
            restarts: self.restarts,
            // While leased, the last settled record (with what a successor
            // needs) stays in the file: persist runs on settle only.
            served: match &self.slot {
                Slot::Idle(p) => p.served().and_then(crate::adopt::served_record),
                Slot::Leased { .. } => None,
            },
            io: self.io,
            secondary: self.secondary.clone(),
        }
    }

    /// Save the record in the lock file (best effort: it only serves a
    /// successor's cleanup, which works without it).
    pub fn persist(&mut self) {
        let rec = self.record();
        crate::worker_log::tag(self.minor, rec.worker);
        if let Err(e) = self.lock.write(&rec) {
            tracing::warn!(
                minor = self.minor.get(),
                "cannot write record of minor {}: {e}",
                self.minor
            );
        }
    }

    /// Save the record as if `phase` were settled, while an operation
    /// holds the minor: a step that must be on record before the next one
    /// (an online snapshot names its child before the worker switches).
    pub(crate) fn persist_as(&mut self, phase: &Phase) -> std::io::Result<()> {
        let mut rec = self.record();
        rec.image = phase.image().map(|i| i.spec.to_string());
        rec.served = phase.served().and_then(crate::adopt::served_record);
        self.lock.write(&rec)
    }

    /// Remove what an idle disk still holds (device, published link) and
    /// its lock file: the minor is free again.
    pub fn release(mut self) {
        if let Slot::Idle(phase) = &mut self.slot {
            if let Some(s) = phase.served_mut() {
                let _ = s.device.teardown();
                let _ = crate::publish::unpublish(&s.link);
            }
        }
        self.lock.release();
    }
}

fn busy(minor: Minor, op: &str) -> BrokerError {
    BrokerError::busy(format!(
        "minor {minor}: another operation ({op}) is in progress"
    ))
}
