//! A merge a crashed broker left held: finished on restart.
//!
//! Between `Hold` and `Switch` the worker holds the guest's I/O and waits
//! for the broker; a broker killed there would leave the disk stalled
//! until someone ran `tap-ctl coalesce` again. After adoption the broker
//! asks each serving worker for its merge (`Wait`) and finishes one that
//! is held (or copied, not yet held): record the new chain, then `Switch`.
//!
//! Finish, not release: `Hold` made the new chain complete and durable
//! (a stream has already dropped the parent from the leaf's footers, a
//! commit has flushed the parent), and the dead broker may or may not
//! have recorded it. The new chain is right in both cases; going back
//! would mean undoing the stream's on-disk detach. A merge still copying
//! holds no I/O and is left for the next `tap-ctl coalesce` to pick up.

use super::*;
use tapjail_common::audit::Event;

impl Broker {
    /// Finish, in the background, every merge adopted workers hold.
    pub(crate) fn resume_held_merges(self: &Arc<Self>) {
        let minors: Vec<Minor> = {
            let t = self.table();
            t.disks
                .iter()
                .filter(|(_, d)| matches!(d.phase(), Ok(Phase::Serving { .. })))
                .map(|(m, _)| *m)
                .collect()
        };
        if minors.is_empty() {
            return;
        }
        let b = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("coalesce-resume".into())
            .spawn(move || {
                for minor in minors {
                    b.resume_merge(minor);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "coalesce: cannot start the thread that finishes held merges");
        }
    }

    fn resume_merge(self: &Arc<Self>, minor: Minor) {
        let owner = self.table().disk(minor).ok().map(|d| d.owner.clone());
        let r = self.finish_held(minor);
        self.after_op(minor);
        let (rule, text) = match r {
            Ok(None) => return,
            Ok(Some(done)) => (
                "adopt-coalesce-finished",
                format!(
                    "minor {minor}: the predecessor left its coalesce ({}) held; finished: chain \
                     {:?}, I/O held {} us at the switch",
                    done.direction, done.chain, done.stall_us
                ),
            ),
            Err(e) => (
                "adopt-coalesce-failed",
                format!(
                    "minor {minor}: the predecessor left its coalesce held; finishing it failed: \
                     {}",
                    e.message
                ),
            ),
        };
        tracing::info!(%minor, rule, "{text}");
        self.notice(Event::Adopt, None, owner, rule, text);
    }

    /// `Ok(None)` when the worker holds no merge that is ready to switch.
    fn finish_held(self: &Arc<Self>, minor: Minor) -> Result<Option<CoalesceDone>, BrokerError> {
        let t = self.when_free(self.table(), minor)?;
        let w = live_worker(&t, minor, None)?;
        let owner = t.disk(minor)?.owner.clone();
        let mut lease = self.lease_when_free(t, minor)?;
        let old = lease
            .phase()
            .image()
            .cloned()
            .ok_or_else(|| BrokerError::failed("serving minor without an image"))?;
        let call = |step: &str, msg: ToWorkerCoalesce| {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let r = conn.call(&ToWorker::Coalesce(msg), &[]);
            match r {
                Ok(r) => coalesce_reply(w.pid, step, r).map_err(failure_error),
                Err(e) => Err(BrokerError::from(e)),
            }
        };
        // A worker that never merged answers Wait with an error: nothing to do.
        let Ok(r) = call("Wait", ToWorkerCoalesce::Wait) else {
            return Ok(None);
        };
        let direction = r.stats.direction;
        match r.stats.state {
            CoalesceState::Held => {}
            CoalesceState::Copied => {
                call("Hold", ToWorkerCoalesce::Hold)?;
            }
            _ => return Ok(None),
        }
        let new = match self.new_chain(&owner, &old, direction, minor) {
            Ok(new) => new,
            Err(e) => {
                // Serve the old chain again (intact: see the module doc of
                // the worker's coalesce) rather than hold I/O.
                let _ = call("Abort", ToWorkerCoalesce::Abort);
                return Err(e);
            }
        };
        let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
        self.record_and_switch(
            &mut lease,
            &conn,
            w.pid,
            minor,
            (&old, new),
            direction,
            r.stats.copied_bytes,
            false,
        )
        .map(Some)
        .map_err(failure_error)
    }

    /// The record after the switch, from the record as the predecessor
    /// left it (before or after it wrote the new chain).
    fn new_chain(
        &self,
        owner: &str,
        old: &OpenImage,
        direction: Direction,
        minor: Minor,
    ) -> Result<OpenImage, BrokerError> {
        match direction {
            // Already on record (killed between steps 4 and 5).
            Direction::Stream if old.chain.len() == 1 => Ok(old.clone()),
            Direction::Stream if old.chain.len() == 2 && old.files.len() == 2 => {
                Ok(new_image(old, direction, &old.grant, old.files[0].0))
            }
            Direction::Commit if old.chain.len() >= 2 && old.files.len() == old.chain.len() => {
                // The checks of a commit's start (policy, not shared); the
                // worker has the parent open for writing (and locked) from
                // that start, which checked it is the file on record.
                let grant = self.commit_parent_grant(owner, old, minor)?;
                let id = old.files[1].0;
                self.table().claim_files(minor, &[(id, true)])?;
                Ok(new_image(old, direction, &grant, id))
            }
            _ => Err(BrokerError::failed(format!(
                "minor {minor}: the record's chain {:?} does not fit a held {direction}",
                old.chain
            ))),
        }
    }
}

fn failure_error(f: Failure) -> BrokerError {
    match f {
        Failure::Died(e) | Failure::Other(e) => e,
    }
}
