//! coalesce: merge the served leaf and its parent while the disk serves
//! (qemu's block-stream and block-commit).
//!
//! The broker decides and opens; the worker parses and copies:
//! 1. the file written is opened with the tenant's credentials: for a
//!    stream the leaf again, for a commit its parent, read-write, refused
//!    if another minor uses that parent (a shared parent, `-e`: the merge
//!    would change the other disk's data);
//! 2. `Start`: the worker copies in the background; the minor is not
//!    leased meanwhile, so `stats` shows progress (other changes are
//!    refused by the worker until the merge ends);
//! 3. `Hold`: I/O held, the last writes copied, the new chain durable;
//! 4. the minor's record names the new chain;
//! 5. `Switch`: the new chain serves.
//!
//! A worker killed anywhere is safe: before 4 the record names the old
//! chain, which the copy never made wrong (see the worker's `coalesce`);
//! after 4 it names the new chain, complete since 3. A merge whose worker
//! died is started again on the respawned worker (a stream resumes where
//! the leaf is filled, a commit copies again).

mod resume;

use super::live_worker;
use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::image_open;
use crate::lease::Lease;
use crate::lifecycle::{OpenImage, Phase};
use crate::table::Table;
use crate::worker::{WorkerConn, WorkerError};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tapjail_common::coalesce::{
    CoalesceDone, CoalesceReply, CoalesceState, Direction, ToWorkerCoalesce,
};
use tapjail_common::proto::{ImageKind, ImageSpec, Reply};
use tapjail_common::worker_proto::{FromWorker, ToWorker, MAX_CHAIN_DEPTH};
use tapjail_common::Minor;

type Guard<'a> = MutexGuard<'a, Table>;

/// Times a merge is started again after its worker died.
const MAX_RESTARTS: u32 = 3;
/// Pause between progress polls, with the worker's connection free.
const POLL: Duration = Duration::from_millis(200);
/// How long another operation on the minor is waited for.
const LEASE_WAIT: Duration = Duration::from_secs(10);
/// How long a respawn is waited for.
const RESPAWN_WAIT: Duration = Duration::from_secs(60);

/// Why one attempt ended.
enum Failure {
    /// The worker died (or was killed): start again on its successor.
    Died(BrokerError),
    Other(BrokerError),
}

impl From<BrokerError> for Failure {
    fn from(e: BrokerError) -> Self {
        Failure::Other(e)
    }
}

fn worker_failure(e: WorkerError) -> Failure {
    match e {
        e @ WorkerError::Worker { .. } => Failure::Other(e.into()),
        e => Failure::Died(e.into()),
    }
}

fn serving(minor: Minor) -> impl FnOnce(&Table, &Phase) -> Result<(), BrokerError> {
    move |_, phase| match phase {
        Phase::Serving { .. } => Ok(()),
        Phase::Paused { .. } => Err(BrokerError::busy(format!(
            "minor {minor} is paused: unpause it first (or coalesce it offline with \
             `tap-ctl vhd coalesce` while paused)"
        ))),
        _ => Err(super::no_image(minor)),
    }
}

fn coalesce_reply(pid: u32, step: &str, r: FromWorker) -> Result<CoalesceReply, Failure> {
    match r {
        FromWorker::Coalesce(r) => Ok(*r),
        other => Err(Failure::Other(BrokerError::failed(format!(
            "tapdisk {pid} answered {} to coalesce {step}",
            crate::worker::variant(&other)
        )))),
    }
}

impl Broker {
    pub fn op_coalesce(
        self: &Arc<Self>,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        direction: Direction,
        rate: u64,
    ) -> Result<Done, BrokerError> {
        let mut t = Some(t);
        let mut restarts = 0;
        loop {
            let guard = match t.take() {
                Some(t) => self.when_free(t, minor)?,
                None => self.when_free(self.table(), minor)?,
            };
            let w = live_worker(&guard, minor, if restarts == 0 { pid } else { None })?;
            let r = self.coalesce_once(guard, &w, minor, direction, rate);
            self.after_op(minor);
            match r {
                Ok(mut done) => {
                    done.restarts = restarts;
                    let text = format!(
                        "minor {minor}: coalesce ({direction}) done, {} bytes copied, I/O held {} \
                         us, chain {:?}, restarts {restarts}",
                        done.copied_bytes, done.stall_us, done.chain
                    );
                    return Ok((Reply::Coalesced(done), text));
                }
                Err(Failure::Died(e)) if restarts < MAX_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(%minor, error = %e.message, "coalesce: tapdisk died; restarting the merge on its successor");
                    self.await_successor(minor, w.pid)?;
                }
                Err(Failure::Died(e) | Failure::Other(e)) => return Err(e),
            }
        }
    }

    /// Wait for the supervisor to replace worker `old` on `minor`.
    fn await_successor(self: &Arc<Self>, minor: Minor, old: u32) -> Result<(), BrokerError> {
        let until = Instant::now() + RESPAWN_WAIT;
        loop {
            {
                let t = self.table();
                if let Ok(w) = live_worker(&t, minor, None) {
                    let serving = matches!(
                        t.disk(minor).and_then(|d| d.phase()),
                        Ok(Phase::Serving { .. })
                    );
                    if w.pid != old && serving {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > until {
                return Err(BrokerError::failed(format!(
                    "minor {minor}: tapdisk {old} died mid-merge and no successor serves after \
                     {} s; the chain is consistent (the old one): run the coalesce again",
                    RESPAWN_WAIT.as_secs()
                )));
            }
            self.after_op(minor);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn coalesce_once(
        &self,
        t: Guard<'_>,
        w: &super::Live,
        minor: Minor,
        direction: Direction,
        rate: u64,
    ) -> Result<CoalesceDone, Failure> {
        let owner = t.disk(minor)?.owner.clone();
        let lease = self.lease_when_free(t, minor)?;
        let old = lease
            .phase()
            .image()
            .cloned()
            .ok_or_else(|| BrokerError::failed("serving minor without an image"))?;
        check_chain(&old, direction, minor)?;
        let deadline = self.open_deadline();
        // The file written, opened with the tenant's credentials.
        let (grant, file) = match direction {
            Direction::Stream => {
                let f = image_open::reopen_for_coalesce(&old.grant, true, deadline)?;
                if Some(f.id) != old.files.first().map(|f| f.0) {
                    return Err(BrokerError::failed(format!(
                        "{}: the path no longer names the file minor {minor} serves: refused",
                        old.grant.path.display()
                    ))
                    .into());
                }
                (old.grant.clone(), f)
            }
            Direction::Commit => self.open_parent_for_commit(&owner, &old, minor)?,
        };
        let target = crate::bringup::Target {
            minor,
            owner: &owner,
            worker_pid: w.pid,
            worker_uid: w.uid,
        };
        let start = ToWorker::Coalesce(ToWorkerCoalesce::Start {
            direction,
            name: grant.path.display().to_string(),
            rate,
        });
        let started = {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let mut names = vec![grant.path.clone()];
            let mut parents = Vec::new();
            conn.with_parents(&start, &[file.file.as_fd()], &mut |req| {
                self.resolve_parent(&target, &grant.open_as, &mut names, &mut parents, req)
            })
        };
        let file_id = file.id;
        drop(file);
        coalesce_reply(w.pid, "Start", started.map_err(worker_failure)?)?;
        // Copying: the minor is free for `stats` meanwhile.
        drop(lease);
        loop {
            let r = {
                let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
                conn.call(&ToWorker::Coalesce(ToWorkerCoalesce::Wait), &[])
            };
            let r = coalesce_reply(w.pid, "Wait", r.map_err(worker_failure)?)?;
            match r.stats.state {
                // Unlocked between polls, so `stats` gets the worker.
                CoalesceState::Copying => std::thread::sleep(POLL),
                // Held: a merge picked up from an earlier request that
                // ended after its `Hold` (Hold again is a no-op).
                CoalesceState::Copied | CoalesceState::Held => break,
                s => {
                    return Err(BrokerError::failed(format!(
                        "minor {minor}: coalesce ({direction}) {}: {}; the disk serves the old \
                         chain",
                        s.as_str(),
                        crate::worker::clean(r.stats.error.as_deref().unwrap_or("no reason"))
                    ))
                    .into())
                }
            }
        }
        let mut lease = self.lease_when_free(self.table(), minor)?;
        if lease.phase().image().map(|i| (&i.chain, &i.files)) != Some((&old.chain, &old.files)) {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let _ = conn.call(&ToWorker::Coalesce(ToWorkerCoalesce::Abort), &[]);
            return Err(BrokerError::busy(format!(
                "minor {minor}'s image changed during the coalesce: aborted"
            ))
            .into());
        }
        let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
        let held = conn.call(&ToWorker::Coalesce(ToWorkerCoalesce::Hold), &[]);
        let held = coalesce_reply(w.pid, "Hold", held.map_err(worker_failure)?)?;
        let new = new_image(&old, direction, &grant, file_id);
        crate::stop_point::reached("coalesce-held");
        self.record_and_switch(
            &mut lease,
            &conn,
            w.pid,
            minor,
            (&old, new),
            direction,
            held.stats.copied_bytes,
            true,
        )
    }

    /// Steps 4 and 5 of a merge the worker holds (its new chain complete
    /// and durable): the record names `new`, then `Switch` serves it. On a
    /// refused `Switch` the old chain is back on record. `stop`: a crash
    /// test may stop the broker here (not when finishing a predecessor's).
    #[allow(clippy::too_many_arguments)]
    fn record_and_switch(
        &self,
        lease: &mut Lease<'_>,
        conn: &WorkerConn,
        pid: u32,
        minor: Minor,
        (old, new): (&OpenImage, OpenImage),
        direction: Direction,
        copied: u64,
        stop: bool,
    ) -> Result<CoalesceDone, Failure> {
        // Complete and durable: on record before any write lands in it.
        set_image(lease, new);
        let recorded = self.table().disk_mut(minor).and_then(|disk| {
            disk.persist_as(lease.phase())
                .map_err(|e| BrokerError::failed(format!("writing minor {minor}'s record: {e}")))
        });
        if let Err(e) = recorded {
            set_image(lease, old.clone());
            let _ = conn.call(&ToWorker::Coalesce(ToWorkerCoalesce::Abort), &[]);
            return Err(e.into());
        }
        if stop {
            crate::stop_point::reached("coalesce-recorded");
        }
        let switched = conn.call(&ToWorker::Coalesce(ToWorkerCoalesce::Switch), &[]);
        match switched {
            Ok(FromWorker::Coalesce(r))
                if r.chain.is_empty() || r.chain.len() > MAX_CHAIN_DEPTH =>
            {
                Err(BrokerError::failed(format!(
                    "tapdisk {pid} reported a chain of {} images after its coalesce",
                    r.chain.len()
                ))
                .into())
            }
            Ok(FromWorker::Coalesce(r)) => {
                let chain: Vec<String> = r.chain.iter().map(|c| crate::worker::clean(c)).collect();
                if let Some(img) = lease.phase_mut().served_mut().map(|s| &mut s.image) {
                    img.chain = chain.clone();
                }
                Ok(CoalesceDone {
                    direction,
                    chain,
                    copied_bytes: r.stats.copied_bytes.max(copied),
                    stall_us: r.stall_us.min(tapjail_common::snapshot::MAX_STALL_US),
                    restarts: 0,
                })
            }
            Ok(other) => Err(BrokerError::failed(format!(
                "tapdisk {pid} answered {} to coalesce Switch",
                crate::worker::variant(&other)
            ))
            .into()),
            // The worker refused and serves the old chain: back to it
            // (the new one is complete too; the old stays the record).
            Err(e @ WorkerError::Worker { .. }) => {
                set_image(lease, old.clone());
                let _ = self.table().disk_mut(minor).and_then(|disk| {
                    disk.persist_as(lease.phase())
                        .map_err(|e| BrokerError::failed(e.to_string()))
                });
                Err(BrokerError::from(e).into())
            }
            // Gone: the record names the new chain, which its successor opens.
            Err(e) => Err(Failure::Other(e.into())),
        }
    }

    /// Lease `minor` once no other operation holds it: a `stats` poll
    /// (brief) must not fail a merge that ran for minutes.
    fn lease_when_free<'a>(&'a self, t: Guard<'_>, minor: Minor) -> Result<Lease<'a>, BrokerError> {
        let t = self.when_free(t, minor)?;
        Lease::take(&self.table, t, minor, "coalesce", serving(minor))
    }

    /// The table, once no other operation leases `minor` (or after
    /// [`LEASE_WAIT`], to fail with that operation's name).
    fn when_free<'a>(&'a self, t: Guard<'_>, minor: Minor) -> Result<Guard<'a>, BrokerError> {
        drop(t);
        let until = Instant::now() + LEASE_WAIT;
        loop {
            let t = self.table();
            if !t.disk(minor)?.is_leased() || Instant::now() >= until {
                return Ok(t);
            }
            drop(t);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A commit's parent, opened read-write with the tenant's credentials
    /// after a policy check (it must be in a root she may write), refused
    /// if another disk uses it.
    fn open_parent_for_commit(
        &self,
        owner: &str,
        old: &OpenImage,
        minor: Minor,
    ) -> Result<(tapjail_policy::ImageGrant, image_open::Opened), BrokerError> {
        let grant = self.commit_parent_grant(owner, old, minor)?;
        let parent = PathBuf::from(&old.chain[1]);
        let parent_id = old.files.get(1).map(|f| f.0);
        let f = image_open::reopen_for_coalesce(&grant, false, self.open_deadline())?;
        if Some(f.id) != parent_id {
            return Err(BrokerError::failed(format!(
                "{}: the path no longer names the parent minor {minor} serves: refused",
                parent.display()
            )));
        }
        self.table().claim_files(minor, &[(f.id, true)])?;
        Ok((grant, f))
    }

    /// The grant to write a commit's parent: beneath a root the tenant may
    /// write, and used by no other disk.
    fn commit_parent_grant(
        &self,
        owner: &str,
        old: &OpenImage,
        minor: Minor,
    ) -> Result<tapjail_policy::ImageGrant, BrokerError> {
        let parent = PathBuf::from(&old.chain[1]);
        let parent_id = old.files.get(1).map(|f| f.0);
        if let Some(id) = parent_id {
            let t = self.table();
            if let Some((m, _)) = t
                .files
                .get(&id)
                .and_then(|users| users.iter().find(|(m, _)| *m != minor))
            {
                return Err(BrokerError::busy(format!(
                    "{}: the parent is shared with minor {m} (another disk's chain uses it): \
                     committing into it would change that disk's data; refused (stream instead, \
                     or close the other disk)",
                    parent.display()
                )));
            }
        }
        let d =
            tapjail_policy::decide_commit_parent(&self.policy, owner, &old.grant.open_as, &parent);
        let grant = match d.image.filter(|_| d.allow) {
            Some(g) => g,
            None => {
                return Err(BrokerError::denied(format!(
                    "{}: committing into the parent needs it beneath your image roots: {}",
                    parent.display(),
                    d.reason
                )))
            }
        };
        if grant.read_only || grant.shared {
            return Err(BrokerError::denied(format!(
                "{}: the parent is in a read-only image root: a commit writes into it; stream \
                 instead (--stream)",
                parent.display()
            )));
        }
        Ok(grant)
    }
}

/// Refuse what cannot be coalesced online, before anything is opened.
fn check_chain(old: &OpenImage, direction: Direction, minor: Minor) -> Result<(), BrokerError> {
    if old.read_only {
        return Err(BrokerError::invalid(format!(
            "minor {minor} is open read-only (-R): an online coalesce writes"
        )));
    }
    if old.spec.kind != ImageKind::Vhd || old.chain.len() < 2 {
        return Err(BrokerError::invalid(format!(
            "minor {minor} serves no differencing VHD (a leaf with a parent): there is nothing \
             to coalesce"
        )));
    }
    if old.files.len() != old.chain.len() {
        return Err(BrokerError::failed(format!(
            "minor {minor}'s record holds {} files for a chain of {}",
            old.files.len(),
            old.chain.len()
        )));
    }
    if direction == Direction::Stream && old.chain.len() > 2 {
        return Err(BrokerError::invalid(format!(
            "minor {minor}: {} has a parent of its own; streaming into a leaf that keeps a \
             grandparent is not built: use --commit",
            old.chain[1]
        )));
    }
    Ok(())
}

/// The record after the switch.
fn new_image(
    old: &OpenImage,
    direction: Direction,
    grant: &tapjail_policy::ImageGrant,
    file_id: (u64, u64),
) -> OpenImage {
    match direction {
        Direction::Stream => OpenImage {
            chain: old.chain[..1].to_vec(),
            files: old.files[..1].to_vec(),
            ..old.clone()
        },
        Direction::Commit => OpenImage {
            spec: ImageSpec {
                kind: ImageKind::Vhd,
                path: grant.path.display().to_string(),
            },
            grant: grant.clone(),
            read_only: false,
            size: old.size,
            chain: old.chain[1..].to_vec(),
            files: std::iter::once((file_id, true))
                .chain(old.files[2..].iter().copied())
                .collect(),
        },
    }
}

fn set_image(lease: &mut Lease<'_>, image: OpenImage) {
    if let Some(s) = lease.phase_mut().served_mut() {
        s.image = image;
    }
}
