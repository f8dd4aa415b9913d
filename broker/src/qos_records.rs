//! Runtime I/O limits kept across broker restarts and worker respawns.
//!
//! A disk's own runtime limits live in its minor record (`MinorRecord::io`,
//! next to what adoption reads); a tenant's shared runtime limits in
//! `STATE_DIR/tenant-io.json`, one map of every tenant changed at runtime.
//! `tap-ctl throttle --tenant` writes the map (durably: temp file, fsync,
//! rename, fsync of the directory) before it applies the change, so a
//! change that could not be recorded is not made. A starting broker reads
//! it back after adoption and hands the limits, with a fresh shared bucket,
//! to the tenant's adopted workers, so old and new disks pace together.
//! A respawned worker gets its limits from the table like any new one.

use crate::broker::Broker;
use crate::error::BrokerError;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use tapjail_common::qos::IoLimits;

/// The file under `state_dir`.
pub const FILE: &str = "tenant-io.json";

/// Every tenant's runtime limits as recorded, and what was wrong with
/// the file if anything (it is then ignored: the policy's limits apply).
pub fn load(state_dir: &Path) -> (BTreeMap<String, IoLimits>, Option<String>) {
    let path = state_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (BTreeMap::new(), None),
        Err(e) => return (BTreeMap::new(), Some(format!("{}: {e}", path.display()))),
    };
    match serde_json::from_slice::<BTreeMap<String, IoLimits>>(&bytes) {
        Ok(map) => match map
            .iter()
            .find_map(|(t, l)| l.check().err().map(|e| (t, e)))
        {
            Some((t, e)) => (
                BTreeMap::new(),
                Some(format!("{}: tenant {t:?}: {e}", path.display())),
            ),
            None => (map, None),
        },
        Err(e) => (BTreeMap::new(), Some(format!("{}: {e}", path.display()))),
    }
}

/// Replace the file with `map`, durably.
pub fn save(state_dir: &Path, map: &BTreeMap<String, IoLimits>) -> io::Result<()> {
    let bytes = serde_json::to_vec(map).map_err(io::Error::other)?;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, state_dir.join(FILE))?;
    std::fs::File::open(state_dir)?.sync_all()
}

impl Broker {
    /// Record `tenant`'s new runtime limits before they are applied.
    pub fn record_tenant_limits(&self, tenant: &str, limits: IoLimits) -> Result<(), BrokerError> {
        let dir = self.state.root();
        let (mut map, problem) = load(dir);
        if let Some(p) = problem {
            tapjail_common::log_line!("tap-broker: replacing unreadable runtime limits: {p}");
        }
        map.insert(tenant.to_string(), limits);
        save(dir, &map).map_err(|e| {
            BrokerError::failed(format!(
                "tenant {tenant}: cannot record the new limits in {}: {e}; nothing changed",
                dir.join(FILE).display()
            ))
        })
    }

    /// At start, after adoption: every tenant's recorded runtime limits
    /// in force again, and handed to her adopted workers. Returns one
    /// line per tenant restored or problem met, for the log and audit.
    pub fn restore_tenant_limits(&self) -> Vec<String> {
        let (map, problem) = load(self.state.root());
        let mut notes: Vec<String> = problem
            .map(|p| format!("runtime tenant limits ignored ({p}); the policy's apply"))
            .into_iter()
            .collect();
        for (tenant, limits) in map {
            if self.policy.tenant(&tenant).is_none() {
                notes.push(format!(
                    "runtime limits of tenant {tenant:?} ignored: not in the policy"
                ));
                continue;
            }
            self.set_tenant_limits(&tenant, limits);
            let workers: Vec<_> = {
                let t = self.table();
                t.disks
                    .values()
                    .filter(|d| d.owner == tenant)
                    .filter_map(|d| {
                        let w = t.attached(d.minor, None).ok().filter(|w| w.alive())?;
                        Some((d.minor, d.io, w.pid, w.conn.clone()))
                    })
                    .collect()
            };
            let mut failed = Vec::new();
            for (minor, own, pid, conn) in &workers {
                let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let r = self
                    .worker_limits(&tenant, *own)
                    .and_then(|l| self.push_limits(&conn, &l, true));
                if let Err(e) = r {
                    failed.push(format!("minor {minor} (tapdisk {pid}): {}", e.message));
                }
            }
            notes.push(format!(
                "tenant {tenant}: runtime limits [{limits}] restored; {} adopted tapdisk(s) took them{}",
                workers.len() - failed.len(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(", not: {}", failed.join("; "))
                }
            ));
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::qos::Rate;

    #[test]
    fn tenant_limits_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut map = BTreeMap::new();
        let limits = IoLimits {
            write_iops: Some(Rate {
                per_sec: 20,
                burst: 5,
            }),
            ..IoLimits::default()
        };
        map.insert("alice".to_string(), limits);
        save(dir.path(), &map).unwrap();
        assert_eq!(load(dir.path()), (map, None));
    }

    #[test]
    fn unreadable_or_invalid_file_is_ignored_and_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load(dir.path()),
            (BTreeMap::new(), None),
            "no file: nothing"
        );
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let (map, problem) = load(dir.path());
        assert!(map.is_empty());
        assert!(problem.unwrap().contains(FILE));
        std::fs::write(
            dir.path().join(FILE),
            br#"{"alice":{"write_iops":{"per_sec":10,"burst":0}}}"#,
        )
        .unwrap();
        let (map, problem) = load(dir.path());
        assert!(map.is_empty());
        assert!(
            problem.unwrap().contains("alice"),
            "an invalid rate is refused"
        );
    }
}
