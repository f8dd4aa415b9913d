//! pause, unpause: the image closed by the worker for a snapshot while
//! the device waits, then reopened (possibly a new leaf of the same size).

use super::{dead, live_worker, no_image};
use crate::audit::Done;
use crate::bringup::ImageReq;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::lifecycle::Phase;
use crate::table::Table;
use std::sync::{Arc, MutexGuard};
use tapjail_common::proto::{ImageKind, Reply};
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;
use tapjail_policy::Decision;

type Guard<'a> = MutexGuard<'a, Table>;

impl Broker {
    pub fn op_pause(
        self: &Arc<Self>,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        let w = live_worker(&t, minor, pid)?;
        let mut lease = Lease::take(&self.table, t, minor, "pause", |_, phase| match phase {
            Phase::Serving { .. } => Ok(()),
            Phase::Paused { .. } => Err(BrokerError::busy(format!(
                "minor {minor} is already paused"
            ))),
            Phase::Dead { worker, .. } => Err(dead(*worker, minor)),
            _ => Err(no_image(minor)),
        })?;
        // What the kernel still holds must be in the image before the
        // worker closes it for the snapshot.
        let r = lease
            .phase_mut()
            .served_mut()
            .map_or(Ok(()), |s| s.device.sync(false))
            .map_err(BrokerError::from)
            .and_then(|()| {
                w.conn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect(&ToWorker::Pause, &[], &FromWorker::Ok)
                    .map_err(BrokerError::from)
            });
        if r.is_ok() {
            if let Phase::Serving { worker, served } =
                std::mem::replace(lease.phase_mut(), Phase::Allocated)
            {
                lease.set(Phase::Paused { worker, served });
            }
        }
        drop(lease);
        self.after_op(minor);
        r?;
        Ok((Reply::Ok, format!("minor {minor} paused")))
    }

    pub fn op_unpause(
        self: &Arc<Self>,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        new_kind: Option<ImageKind>,
        d: &Decision,
    ) -> Result<Done, BrokerError> {
        let w = live_worker(&t, minor, pid)?;
        let owner = t.disk(minor)?.owner.clone();
        let mut lease = Lease::take(&self.table, t, minor, "unpause", |_, phase| match phase {
            Phase::Paused { .. } => Ok(()),
            _ => Err(BrokerError::busy(format!("minor {minor} is not paused"))),
        })?;
        let Some(old) = lease.phase().image().cloned() else {
            return Err(BrokerError::failed("paused minor without an image"));
        };
        let (kind, grant) = match (&d.image, new_kind) {
            (Some(g), Some(k)) => (k, g.clone()),
            _ => (old.spec.kind, old.grant.clone()),
        };
        // The paused image's files stay claimed until the lease ends with
        // the new image's (or, on failure, the old one's).
        let req = ImageReq {
            kind,
            grant: &grant,
            read_only: old.read_only,
            unpause: true,
            leaf: None,
        };
        let up = match self.bring_up_on(&w, minor, &owner, req) {
            Ok(up) if up.image.size != old.size => {
                // The worker should have refused; put it back in pause.
                let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
                let _ = conn.call(&ToWorker::Pause, &[]);
                Err(BrokerError::invalid(format!(
                    "{} has virtual size {} but the paused disk has {}: refused",
                    up.image.spec, up.image.size, old.size
                )))
            }
            other => other,
        };
        let result = up.map(|up| {
            if let Phase::Paused { worker, mut served } =
                std::mem::replace(lease.phase_mut(), Phase::Allocated)
            {
                served.image = up.image;
                lease.set(Phase::Serving { worker, served });
            }
        });
        drop(lease);
        self.after_op(minor);
        result?;
        Ok((
            Reply::Ok,
            format!("minor {minor} unpaused on {kind}:{}", grant.path.display()),
        ))
    }
}
