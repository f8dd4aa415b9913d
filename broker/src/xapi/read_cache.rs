//! `open -r`: the broker's half. The policy allowed the open only beneath
//! the tenant's `read_cache_root`; every later reopen of the minor (an
//! unpause at a new path, a respawn) is held to the same root here, since
//! the worker writes fills into whatever file it is handed as the cache.

use crate::broker::Broker;
use crate::error::BrokerError;
use std::path::Path;
use tapjail_policy::path::under_root;

impl Broker {
    /// Refuse `path` as `owner`'s read cache unless it lies beneath her
    /// `read_cache_root` (paths here are the grant's, normalized).
    pub(crate) fn check_read_cache_path(
        &self,
        owner: &str,
        path: &Path,
    ) -> Result<(), BrokerError> {
        let root = self
            .policy
            .tenant(owner)
            .and_then(|t| t.read_cache_root.as_ref());
        match root {
            Some(root) if under_root(path, std::slice::from_ref(root)).is_some() => Ok(()),
            Some(root) => Err(BrokerError::denied(format!(
                "-r: this minor is a read cache, and {} is not beneath tenant {owner}'s \
                 read_cache_root {}: a read cache is reopened only there",
                path.display(),
                root.display()
            ))),
            None => Err(BrokerError::denied(format!(
                "-r: this minor is a read cache and tenant {owner}'s policy no longer names a \
                 read_cache_root"
            ))),
        }
    }
}
