//! throttle: an admin changes I/O limits at runtime (policy decides that
//! only an admin may). The audit line of the outcome carries the old and
//! the new values; the worker(s) get the new ones at once.

use super::Live;
use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::table::Table;
use std::sync::{Arc, MutexGuard};
use tapjail_common::proto::{ErrorKind, Reply};
use tapjail_common::qos::{IoLimits, Knob, Rate, ThrottleTarget};
use tapjail_common::Minor;

/// `old` with `changes` applied, checked.
fn apply(old: IoLimits, changes: &[(Knob, Option<Rate>)]) -> Result<IoLimits, BrokerError> {
    if changes.is_empty() {
        return Err(BrokerError::new(
            ErrorKind::Invalid,
            "nothing to change: give at least one of --read-iops, --write-iops, --read-bps, \
             --write-bps (RATE, RATE:BURST or off)",
        ));
    }
    let mut new = old;
    for (knob, rate) in changes {
        if let Some(r) = rate {
            r.check(*knob)
                .map_err(|e| BrokerError::new(ErrorKind::Invalid, e))?;
        }
        new.set(*knob, *rate);
    }
    Ok(new)
}

impl Broker {
    pub fn op_throttle(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        target: &ThrottleTarget,
        changes: &[(Knob, Option<Rate>)],
    ) -> Result<Done, BrokerError> {
        match target {
            ThrottleTarget::Minor(m) => self.throttle_minor(t, *m, changes),
            ThrottleTarget::Tenant(name) => self.throttle_tenant(t, name, changes),
        }
    }

    fn throttle_minor(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        minor: Minor,
        changes: &[(Knob, Option<Rate>)],
    ) -> Result<Done, BrokerError> {
        let disk = t.disk(minor)?;
        let owner = disk.owner.clone();
        let old = self.disk_limits(&owner, disk.io);
        let new = apply(old, changes)?;
        let live = t
            .attached(minor, None)
            .ok()
            .filter(|w| w.alive())
            .map(Live::of);
        // Held so that no open or respawn pushes limits meanwhile.
        let lease = Lease::take(&self.table, t, minor, "throttle", |_, _| Ok(()))?;
        self.table().disk_mut(minor)?.io = Some(new);
        let pushed = match &live {
            Some(w) => {
                let l = self.worker_limits(&owner, Some(new))?;
                let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
                self.push_limits(&conn, &l, true)
                    .map(|()| format!("; tapdisk {} took them", w.pid))
            }
            None => Ok("; no live tapdisk: they apply when one serves it".to_string()),
        };
        drop(lease);
        self.after_op(minor);
        let pushed = pushed.map_err(|e| {
            BrokerError::failed(format!(
                "minor {minor}: limits recorded ({new}) but the worker did not take them: {}",
                e.message
            ))
        })?;
        Ok((
            Reply::Throttled(new),
            format!("minor {minor} of {owner}: old [{old}] new [{new}]{pushed}"),
        ))
    }

    fn throttle_tenant(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        tenant: &str,
        changes: &[(Knob, Option<Rate>)],
    ) -> Result<Done, BrokerError> {
        if self.policy.tenant(tenant).is_none() {
            return Err(BrokerError::not_found(format!(
                "no tenant named {tenant:?} in the broker's policy"
            )));
        }
        let old = self.tenant_limits(tenant);
        let new = apply(old, changes)?;
        self.record_tenant_limits(tenant, new)?;
        // The tenant's serving workers, each with its disk's own limits.
        let workers: Vec<(Minor, Option<IoLimits>, Live)> = t
            .disks
            .values()
            .filter(|d| d.owner == tenant)
            .filter_map(|d| {
                let w = t.attached(d.minor, None).ok().filter(|w| w.alive())?;
                Some((d.minor, d.io, Live::of(w)))
            })
            .collect();
        self.set_tenant_limits(tenant, new);
        drop(t);
        let mut failed = Vec::new();
        for (minor, own, w) in &workers {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let r = self
                .worker_limits(tenant, *own)
                .and_then(|l| self.push_limits(&conn, &l, true));
            if let Err(e) = r {
                failed.push(format!("minor {minor} (tapdisk {}): {}", w.pid, e.message));
            }
        }
        if !failed.is_empty() {
            return Err(BrokerError::failed(format!(
                "tenant {tenant}: limits recorded ({new}) but {} of {} workers did not take them: {}",
                failed.len(),
                workers.len(),
                failed.join("; ")
            )));
        }
        Ok((
            Reply::Throttled(new),
            format!(
                "tenant {tenant}: old [{old}] new [{new}]; {} tapdisk(s) took them",
                workers.len()
            ),
        ))
    }
}
