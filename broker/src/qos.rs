//! I/O limits on the broker's side: which limits a worker gets, the
//! tenants' shared buckets, and pushing limits to workers.
//!
//! The broker never throttles anything itself (the worker does, in its
//! request path: `tapjail_worker::qos`). A disk's limits are its own if an
//! admin set them (`Disk::io`), else its tenant's `disk_io`; its tenant's
//! shared limits are `tenant_io`, changed at runtime here. Each tenant
//! with shared limits has one memfd, created here and passed only to that
//! tenant's workers, which count their requests in it with atomics: a
//! worker can reach its own tenant's budget and no other.
//!
//! Runtime changes are recorded (`crate::qos_records`): a restarted
//! broker restores them after adoption and hands the tenant's adopted
//! workers her limits with a new bucket (they replace theirs), so her old
//! and new disks share one budget again; a respawned worker gets its
//! disk's limits from the table.

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::worker::WorkerConn;
use rustix::fs::{MemfdFlags, SealFlags};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use tapjail_common::qos::{IoLimits, ThrottleStats};
use tapjail_common::worker_proto::{FromWorker, ToWorker};

/// Size of a tenant bucket file: one page, sealed (it holds four cells).
const BUCKET_BYTES: u64 = 4096;

/// One tenant's runtime state.
#[derive(Debug, Default)]
struct TenantQos {
    /// Changed at runtime; `None`: the policy's `tenant_io`.
    limits: Option<IoLimits>,
    bucket: Option<Arc<OwnedFd>>,
}

/// Every tenant's runtime limits and buckets.
#[derive(Debug, Default)]
pub struct TenantsQos {
    tenants: Mutex<HashMap<String, TenantQos>>,
}

/// A tenant's bucket: a sealed memfd of [`BUCKET_BYTES`]. Sealed against
/// shrinking and growing, so a worker holding it cannot truncate it under
/// the others (which would fault on their next access) nor grow it.
pub fn new_bucket(tenant: &str) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        format!("tapjail-io-{tenant}"),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, BUCKET_BYTES)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// What a worker is told: its disk's limits, its tenant's, and the
/// tenant's bucket when the tenant's limits need it.
#[derive(Debug, Clone)]
pub struct WorkerLimits {
    pub disk: IoLimits,
    pub tenant: IoLimits,
    pub bucket: Option<Arc<OwnedFd>>,
}

impl TenantsQos {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TenantQos>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Broker {
    /// The limits all of `tenant`'s disks share now.
    pub fn tenant_limits(&self, tenant: &str) -> IoLimits {
        let from_policy = || {
            self.policy
                .tenant(tenant)
                .map(|t| t.tenant_io)
                .unwrap_or_default()
        };
        self.qos
            .lock()
            .get(tenant)
            .and_then(|q| q.limits)
            .unwrap_or_else(from_policy)
    }

    /// A disk's own limits: `own` (set by an admin) or its tenant's default.
    pub fn disk_limits(&self, tenant: &str, own: Option<IoLimits>) -> IoLimits {
        own.unwrap_or_else(|| {
            self.policy
                .tenant(tenant)
                .map(|t| t.disk_io)
                .unwrap_or_default()
        })
    }

    /// Record `tenant`'s new shared limits.
    pub fn set_tenant_limits(&self, tenant: &str, limits: IoLimits) {
        self.qos
            .lock()
            .entry(tenant.to_string())
            .or_default()
            .limits = Some(limits);
    }

    /// What a worker of `tenant` serving a disk with `own` limits gets;
    /// the tenant's bucket is made the first time it is needed.
    pub fn worker_limits(
        &self,
        tenant: &str,
        own: Option<IoLimits>,
    ) -> Result<WorkerLimits, BrokerError> {
        let disk = self.disk_limits(tenant, own);
        let shared = self.tenant_limits(tenant);
        let bucket = if shared.is_unlimited() {
            None
        } else {
            let mut all = self.qos.lock();
            let q = all.entry(tenant.to_string()).or_default();
            if q.bucket.is_none() {
                let fd = new_bucket(tenant).map_err(|e| {
                    BrokerError::failed(format!(
                        "creating the I/O bucket of tenant {tenant} (memfd): {e}"
                    ))
                })?;
                q.bucket = Some(Arc::new(fd));
            }
            q.bucket.clone()
        };
        Ok(WorkerLimits {
            disk,
            tenant: shared,
            bucket,
        })
    }

    /// Tell a worker its limits. With `always` false nothing is sent when
    /// nothing is limited (a fresh worker has no limits).
    pub fn push_limits(
        &self,
        conn: &WorkerConn,
        l: &WorkerLimits,
        always: bool,
    ) -> Result<(), BrokerError> {
        if !always && l.disk.is_unlimited() && l.tenant.is_unlimited() {
            return Ok(());
        }
        let msg = ToWorker::Limits {
            disk: l.disk,
            tenant: l.tenant,
        };
        let fds: Vec<_> = l.bucket.iter().map(|b| b.as_fd()).collect();
        conn.call(&msg, &fds)?;
        Ok(())
    }

    /// The worker's throttle figures, `None` if it gives none.
    pub fn throttle_stats(&self, conn: &WorkerConn) -> Option<ThrottleStats> {
        match conn.call(&ToWorker::ThrottleStats, &[]) {
            Ok(FromWorker::Throttle(s)) => Some(*s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_sealed_against_resizing() {
        let fd = new_bucket("t").unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(st.st_size as u64, BUCKET_BYTES);
        // What a hostile worker of the tenant would try, to fault the
        // tenant's other workers on their next access: refused.
        assert_eq!(
            rustix::fs::ftruncate(&fd, 0).unwrap_err(),
            rustix::io::Errno::PERM
        );
        assert_eq!(
            rustix::fs::ftruncate(&fd, 1 << 30).unwrap_err(),
            rustix::io::Errno::PERM
        );
        // Nor can the seals be lifted or changed.
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::WRITE).is_err());
    }
}
