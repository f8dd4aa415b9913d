//! Which cgroup a worker runs in: `<root>/<tenant>/<minor>`, or
//! `<root>/<tenant>/spawn-<uid>` for a worker spawned before it is
//! attached (`tap-ctl spawn`), moved to its minor's at `attach`.

use crate::broker::Broker;
use crate::error::BrokerError;
use std::sync::Arc;
use tapjail_broker::cgroup::Leaf;
use tapjail_common::Minor;

impl Broker {
    fn cgroup_leaf(&self, tenant: &str, name: &str) -> Result<Option<Arc<Leaf>>, BrokerError> {
        let weights = self
            .policy
            .tenants
            .iter()
            .find(|t| t.name == tenant)
            .map(|t| t.cgroup)
            .unwrap_or_default();
        self.spawn_cfg
            .cgroups
            .leaf(tenant, weights, name)
            .map_err(|e| BrokerError::failed(format!("worker cgroup: {e}")))
    }

    /// The cgroup a new worker of `tenant` starts in.
    pub(super) fn worker_cgroup(
        &self,
        tenant: &str,
        minor: Option<Minor>,
        uid: u32,
    ) -> Result<Option<Arc<Leaf>>, BrokerError> {
        match minor {
            Some(m) => self.cgroup_leaf(tenant, &m.get().to_string()),
            None => self.cgroup_leaf(tenant, &format!("spawn-{uid}")),
        }
    }

    /// Move worker `pid` of `tenant` into `minor`'s cgroup (at attach).
    /// Memory it charged before stays charged to its `spawn-UID` cgroup,
    /// which is removed and whose charges count in the tenant's.
    pub fn minor_cgroup(
        &self,
        tenant: &str,
        minor: Minor,
        pid: u32,
    ) -> Result<Option<Arc<Leaf>>, BrokerError> {
        let Some(leaf) = self.cgroup_leaf(tenant, &minor.get().to_string())? else {
            return Ok(None);
        };
        leaf.enter(pid).map_err(|e| {
            BrokerError::failed(format!("moving tapdisk {pid} to its minor's cgroup: {e}"))
        })?;
        Ok(Some(leaf))
    }
}
