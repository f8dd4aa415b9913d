//! stats: the worker's counters, with its untrusted text cleaned.

use super::live_worker;
use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::table::Table;
use crate::worker::clean;
use std::sync::{Arc, MutexGuard};
use tapjail_common::proto::{Reply, StatsReply};
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;

impl Broker {
    pub fn op_stats(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        let w = live_worker(&t, minor, pid)?;
        let disk = t.disk(minor)?;
        let (frontend, restarts, tenant) =
            (disk.shown().frontend, disk.restarts, disk.owner.clone());
        let cgroup = t.worker(w.pid)?.cgroup.clone();
        // Held so that the answer is about the phase it was asked in.
        let lease = Lease::take(&self.table, t, minor, "stats", |_, _| Ok(()))?;
        let (r, throttle) = {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let r = conn.call(&ToWorker::Stats, &[]);
            let throttle = r.as_ref().ok().and_then(|_| self.throttle_stats(&conn));
            (r, throttle)
        };
        drop(lease);
        self.after_op(minor);
        let mut ws = match r? {
            FromWorker::Stats(ws) => *ws,
            _ => {
                return Err(BrokerError::failed(format!(
                    "tapdisk {} answered Stats with something else",
                    w.pid
                )))
            }
        };
        // Worker text is untrusted.
        ws.name = clean(&ws.name);
        ws.frontend.kind = clean(&ws.frontend.kind);
        for img in &mut ws.images {
            img.name = clean(&img.name);
            img.driver.name = clean(&img.driver.name);
            img.driver.status = img.driver.status.as_deref().map(clean);
        }
        ws.histograms.sanitize();
        if let Some(m) = &mut ws.mirror {
            m.uri = clean(&m.uri);
            m.error = m.error.as_deref().map(clean);
        }
        if let Some(c) = &mut ws.coalesce {
            c.error = c.error.as_deref().map(clean);
        }
        self.mirrors.fill_stats(minor, &mut ws);
        Ok((
            Reply::Stats(Box::new(StatsReply {
                minor,
                pid: w.pid,
                frontend,
                restarts,
                worker: ws,
                tenant,
                cgroup: cgroup.map(|c| c.stats()),
                throttle,
            })),
            format!("stats of minor {minor}"),
        ))
    }
}
