//! The operations, as blktap's tap-ctl names them, one module per group
//! of verbs. Each checks the minor's phase (a misuse gets a clear error
//! and changes nothing), leases the minor for slow work and commits the
//! next phase (see [`crate::lease`]).

mod cbt;
mod coalesce;
mod image;
mod minors;
mod pause;
mod snapshot;
mod stats;
mod throttle;

use crate::bringup::{DeviceMode, ImageReq, Target, Up};
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lifecycle::{Phase, Served};
use crate::table::{Table, Worker};
use crate::worker::WorkerConn;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use tapjail_common::Minor;

fn io_err(what: &str) -> impl Fn(std::io::Error) -> BrokerError + '_ {
    move |e| BrokerError::failed(format!("{what}: {e}"))
}

fn dead(pid: u32, minor: Minor) -> BrokerError {
    BrokerError::failed(format!(
        "tapdisk {pid} serving minor {minor} is dead: `tap-ctl destroy -m {minor}` releases it"
    ))
}

fn no_image(minor: Minor) -> BrokerError {
    BrokerError::busy(format!("minor {minor} has no image open"))
}

/// The live worker attached to `minor` (checking `-p`), as what an
/// operation needs of it.
#[derive(Debug, Clone)]
struct Live {
    pid: u32,
    uid: u32,
    conn: Arc<Mutex<WorkerConn>>,
    pidfd: Arc<OwnedFd>,
    alive: bool,
}

impl Live {
    fn of(w: &Worker) -> Live {
        Live {
            pid: w.pid,
            uid: w.uid,
            conn: w.conn.clone(),
            pidfd: w.pidfd.clone(),
            alive: w.alive(),
        }
    }
}

impl Broker {
    /// Open `req` on `w` for `minor` (of `owner`): the chain, and the
    /// device too unless it is an unpause.
    fn bring_up_on(
        &self,
        w: &Live,
        minor: Minor,
        owner: &str,
        req: ImageReq<'_>,
    ) -> Result<Up, BrokerError> {
        let target = Target {
            minor,
            owner,
            worker_pid: w.pid,
            worker_uid: w.uid,
        };
        let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.bring_up(&target, &conn, req, DeviceMode::Fresh)
    }
}

/// The worker attached to `minor`, refused if it is dead.
fn live_worker(t: &Table, minor: Minor, pid: Option<u32>) -> Result<Live, BrokerError> {
    let w = t.attached(minor, pid)?;
    if !w.alive() {
        return Err(dead(w.pid, minor));
    }
    Ok(Live::of(w))
}

/// Take down what a served image left in the kernel and in `device_dir`
/// (the worker is done with it or gone); problems are reported, not fatal.
fn drop_served(served: Served, problems: &mut Vec<String>) {
    let Served {
        mut device, link, ..
    } = served;
    if let Err(e) = device.teardown() {
        problems.push(format!("device: {e}"));
    }
    if let Err(e) = crate::publish::unpublish(&link) {
        problems.push(e.message);
    }
}

/// The phase after the image of `phase` is gone: attached and closed
/// (`Dead` again if the worker is dead; see `Lease::commit`).
fn closed(phase: Phase) -> (Phase, Option<Served>) {
    match phase {
        Phase::Serving { worker, served } | Phase::Paused { worker, served } => (
            Phase::Attached {
                worker,
                closed: true,
            },
            Some(served),
        ),
        Phase::Dead { worker, served, .. } => (
            Phase::Dead {
                worker,
                served: None,
                paused: false,
                closed: true,
            },
            served,
        ),
        other => (other, None),
    }
}

fn problems_result(problems: Vec<String>) -> Result<(), BrokerError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BrokerError::failed(problems.join("; ")))
    }
}
