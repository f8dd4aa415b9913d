//! allocate, free, spawn, attach, detach: minors and workers, before and
//! after an image.

use super::{closed, drop_served, io_err, problems_result};
use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::lifecycle::{Disk, Phase};
use crate::records::StateDir;
use crate::table::Table;
use std::sync::{Arc, MutexGuard};
use tapjail_common::proto::Reply;
use tapjail_common::Minor;
use tapjail_policy::Decision;

type Guard<'a> = MutexGuard<'a, Table>;

impl Broker {
    pub(super) fn device_path(&self, minor: Minor) -> String {
        self.policy
            .device_dir
            .join(minor.device_name())
            .display()
            .to_string()
    }

    /// Take a free minor (the one asked for, or the lowest in the range
    /// the policy allows) and its lock file.
    pub(super) fn allocate_minor(
        &self,
        t: &mut Table,
        tenant: &str,
        d: &Decision,
        want: Option<Minor>,
    ) -> Result<Minor, BrokerError> {
        let take = |t: &mut Table, state: &StateDir, m: Minor| -> Result<bool, BrokerError> {
            match state.lock_minor(m).map_err(io_err("minor lock"))? {
                Some(lock) => {
                    t.disks.insert(m, Disk::new(m, tenant.to_string(), lock));
                    Ok(true)
                }
                None => Ok(false),
            }
        };
        if let Some(m) = want {
            if t.disks.contains_key(&m) {
                return Err(BrokerError::busy(format!("minor {m} is already allocated")));
            }
            if !take(t, &self.state, m)? {
                return Err(BrokerError::busy(format!(
                    "minor {m} is held by another tap-broker"
                )));
            }
            return Ok(m);
        }
        let (lo, hi) = d.minors.unwrap_or((0, Minor::COUNT - 1));
        for n in lo..=hi {
            let m = Minor::new(u64::from(n)).map_err(|e| BrokerError::failed(e.to_string()))?;
            if !t.disks.contains_key(&m) && take(t, &self.state, m)? {
                return Ok(m);
            }
        }
        Err(BrokerError::busy(format!("no free minor in {lo}..={hi}")))
    }

    pub fn op_allocate(
        &self,
        mut t: Guard<'_>,
        tenant: &str,
        d: &Decision,
        want: Option<Minor>,
    ) -> Result<Done, BrokerError> {
        let m = self.allocate_minor(&mut t, tenant, d, want)?;
        Ok((
            Reply::Allocated {
                minor: m,
                device: self.device_path(m),
            },
            format!("minor {m}"),
        ))
    }

    /// Free a minor with no live worker (a dead one's entry goes with it).
    pub fn op_free(&self, mut t: Guard<'_>, minor: Minor) -> Result<Done, BrokerError> {
        let phase = t.disk(minor)?.phase()?;
        if let Some(pid) = phase.worker() {
            if !matches!(phase, Phase::Dead { .. }) && t.worker(pid)?.alive() {
                return Err(BrokerError::busy(format!(
                    "minor {minor} is attached to tapdisk {pid}: detach it first (or use destroy)"
                )));
            }
            if let Some(w) = t.workers.remove(&pid) {
                w.record.release();
            }
        }
        if let Some(disk) = t.disks.remove(&minor) {
            disk.release();
        }
        t.set_files(minor, &[]);
        Ok((Reply::Ok, format!("minor {minor} freed")))
    }

    pub fn op_spawn(self: &Arc<Self>, t: Guard<'_>, tenant: &str) -> Result<Done, BrokerError> {
        let pid = self.spawn_worker(t, tenant, None)?;
        Ok((Reply::Spawned { pid }, format!("tapdisk {pid}")))
    }

    pub fn op_attach(&self, mut t: Guard<'_>, pid: u32, minor: Minor) -> Result<Done, BrokerError> {
        if let Some(other) = t.disk(minor)?.phase()?.worker() {
            return Err(BrokerError::busy(format!(
                "minor {minor} is already attached to tapdisk {other}"
            )));
        }
        let w = t.worker(pid)?;
        if !w.alive() {
            return Err(BrokerError::failed(format!("tapdisk {pid} is dead")));
        }
        if let Some(m) = w.minor {
            return Err(BrokerError::busy(format!(
                "tapdisk {pid} is already attached to minor {m}"
            )));
        }
        // Into the minor's own cgroup (from its `spawn-UID` one).
        let owner = w.owner.clone();
        let cgroup = self.minor_cgroup(&owner, minor, pid)?;
        if let Some(w) = t.workers.get_mut(&pid) {
            w.minor = Some(minor);
            if cgroup.is_some() {
                w.cgroup = cgroup;
            }
        }
        let disk = t.disk_mut(minor)?;
        *disk.phase_mut()? = Phase::Attached {
            worker: pid,
            closed: false,
        };
        disk.persist();
        Ok((
            Reply::Ok,
            format!("tapdisk {pid} attached to minor {minor}"),
        ))
    }

    pub fn op_detach(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        let lease = self.lease_for_detach(t, pid, minor)?;
        self.detach(lease)?;
        Ok((Reply::Ok, format!("minor {minor} detached")))
    }

    /// Lease `minor` to detach its worker: refused while a live worker
    /// has an image open.
    fn lease_for_detach(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Lease<'_>, BrokerError> {
        Lease::take(&self.table, t, minor, "detach", |t, phase| {
            t.attached(minor, pid)?;
            match phase {
                Phase::Serving { served, .. } | Phase::Paused { served, .. } => {
                    Err(BrokerError::busy(format!(
                        "minor {minor} still has {} open: close it first (or use destroy)",
                        served.image.spec
                    )))
                }
                _ => Ok(()),
            }
        })
    }

    /// Stop the leased minor's worker; the minor stays, allocated. What a
    /// dead worker served is taken down first.
    pub(super) fn detach(&self, mut lease: Lease<'_>) -> Result<u32, BrokerError> {
        let mut problems = Vec::new();
        let (phase, served) = closed(std::mem::replace(lease.phase_mut(), Phase::Allocated));
        let Some(wpid) = phase.worker() else {
            lease.set(phase);
            return Err(BrokerError::failed("detach of a minor without a worker"));
        };
        lease.set(phase);
        if let Some(s) = served {
            drop_served(s, &mut problems);
        }
        self.stop_worker(wpid);
        self.forget_worker(wpid);
        lease.commit(Phase::Allocated);
        problems_result(problems).map(|()| wpid)
    }
}
