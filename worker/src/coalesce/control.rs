//! The control thread's side of an online coalesce: the broker's steps
//! ([`ToWorkerCoalesce`]) and what may not run while a merge does.

use super::Job;
use crate::control::{BrokerParents, Worker};
use std::os::fd::{AsFd, OwnedFd};
use tapjail_common::coalesce::ToWorkerCoalesce;
use tapjail_common::worker_proto::{FromWorker, ToWorker};

fn error(msg: impl std::fmt::Display) -> FromWorker {
    FromWorker::Error(msg.to_string())
}

impl Worker {
    /// Why `req` must wait for the running merge, if it must.
    pub(crate) fn coalesce_refuses(&self, req: &ToWorker) -> Option<String> {
        let job = self.coalesce.as_ref().filter(|j| j.active())?;
        let what = match req {
            ToWorker::Pause => "pause",
            ToWorker::Unpause { .. } => "unpause",
            ToWorker::SnapshotPrepare { .. } => "an online snapshot",
            ToWorker::Mirror { .. } => "mirroring",
            _ => return None,
        };
        let s = job.stats();
        Some(format!(
            "an online coalesce ({}) is running on this disk, {} of {} chunks done: {what} must \
             wait for it (`tap-ctl stats` shows its progress)",
            s.direction, s.done, s.total
        ))
    }

    pub(crate) fn coalesce(&mut self, req: ToWorkerCoalesce, mut fds: Vec<OwnedFd>) -> FromWorker {
        let reply = |job: &Job| FromWorker::Coalesce(Box::new(job.reply()));
        match req {
            ToWorkerCoalesce::Start {
                direction,
                name,
                rate,
            } => {
                let Some(open) = &self.open else {
                    return error("no image is open");
                };
                if open.paused {
                    return error("the disk is paused: unpause it before a coalesce");
                }
                if let Some(job) = self.coalesce.as_ref().filter(|j| j.active()) {
                    // A broker that lost track (restarted, or its request
                    // ended) asks again: the same merge is picked up.
                    if job.stats().direction == direction && job.name() == name {
                        return reply(job);
                    }
                    return error("an online coalesce is running on this disk already");
                }
                if self.mirror.active() {
                    return error(
                        "the disk mirrors its writes to a secondary (-2): an online coalesce \
                         would end the mirror; stop mirroring first",
                    );
                }
                if fds.len() != 1 {
                    return error("Coalesce Start needs exactly one fd (the file written)");
                }
                let Some(file) = fds.pop() else {
                    return error("Coalesce Start needs exactly one fd");
                };
                // The old job (finished) lets go of its files first.
                self.coalesce = None;
                let disk = open.disk.clone();
                let mut parents = BrokerParents::new(self.sock.as_fd(), self.parent_cache)
                    .on_resync(&self.resync);
                match Job::start(
                    &disk,
                    direction,
                    &name,
                    rate,
                    file,
                    self.cache,
                    &mut parents,
                ) {
                    Ok(job) => {
                        let r = reply(&job);
                        self.coalesce = Some(job);
                        r
                    }
                    Err(e) => error(format!("coalesce ({direction}) into {name}: {e}")),
                }
            }
            ToWorkerCoalesce::Wait => match &self.coalesce {
                None => error("no online coalesce has run on this disk"),
                Some(job) => {
                    job.wait();
                    reply(job)
                }
            },
            ToWorkerCoalesce::Hold => match &mut self.coalesce {
                None => error("no online coalesce is running"),
                Some(job) => match job.hold() {
                    Ok(()) => reply(job),
                    Err(e) => error(format!("coalesce: finishing the copy: {e}")),
                },
            },
            ToWorkerCoalesce::Switch => {
                let cbt = self.cbt.clone();
                let Some(job) = &mut self.coalesce else {
                    return error("no online coalesce is running");
                };
                match job.switch(|img| crate::cbt::Tracked::wrap(img, cbt)) {
                    Ok(()) => {
                        let r = reply(job);
                        if let (Some(open), Some(leaf)) = (&mut self.open, r_leaf(&r)) {
                            open.name = format!("vhd:{leaf}");
                        }
                        r
                    }
                    Err(e) => error(format!("coalesce: switching: {e}")),
                }
            }
            ToWorkerCoalesce::Abort => {
                if let Some(job) = &mut self.coalesce {
                    job.abort();
                    return reply(job);
                }
                error("no online coalesce is running")
            }
        }
    }
}

fn r_leaf(r: &FromWorker) -> Option<String> {
    match r {
        FromWorker::Coalesce(c) => c.chain.first().cloned(),
        _ => None,
    }
}
