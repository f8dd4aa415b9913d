//! snapshot: a new differencing child of the served leaf becomes the leaf
//! while the disk serves (qemu's `blockdev-snapshot`).
//!
//! The broker decides and opens; the worker parses and switches:
//! 1. the child file is created beneath the tenant's root with her
//!    credentials (`O_CREAT|O_EXCL`, locked as a writable leaf), and the
//!    leaf re-opened read-only (locked as a parent);
//! 2. `SnapshotPrepare`: the worker writes and syncs the child's metadata
//!    while I/O carries on (the leaf's parents are asked for and audited
//!    as for an open);
//! 3. the minor's record names the child as the leaf;
//! 4. `SnapshotSwitch`: the worker holds I/O, flushes the old leaf and
//!    stacks the child on it.
//!
//! A worker killed anywhere is safe. Before 3 the child holds nothing
//! and is removed; the respawned worker opens the old leaf. After 3 the
//! respawned worker opens the child: whether or not the switch happened,
//! the child is complete, empty or holding the writes made since, over a
//! parent that holds every write before them.

use super::{dead, live_worker, no_image};
use crate::audit::Done;
use crate::bringup::Target;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::image_open;
use crate::lease::Lease;
use crate::lifecycle::{OpenImage, Phase};
use crate::table::Table;
use crate::worker::WorkerError;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, MutexGuard};
use tapjail_common::proto::{ImageKind, ImageSpec, Reply};
use tapjail_common::snapshot::{SnapshotDone, SnapshotParent};
use tapjail_common::worker_proto::{FromWorker, ToWorker, MAX_CHAIN_DEPTH};
use tapjail_common::Minor;
use tapjail_policy::{Decision, ImageGrant};

type Guard<'a> = MutexGuard<'a, Table>;

/// `to` relative to the directory `from_dir`, both absolute and
/// normalized (as the policy hands them out): `./x.vhd`, `../a/x.vhd`.
pub fn relative_to(from_dir: &Path, to: &Path) -> String {
    let a: Vec<Component<'_>> = from_dir.components().collect();
    let b: Vec<Component<'_>> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    if common == a.len() {
        out.push(".");
    }
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    out.display().to_string()
}

/// What the worker writes into the child about its parent, `leaf`.
fn parent_of(child: &Path, leaf: &Path) -> SnapshotParent {
    let dir = child.parent().unwrap_or(Path::new("/"));
    SnapshotParent {
        name: leaf
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        relative: relative_to(dir, leaf),
        absolute: leaf.display().to_string(),
    }
}

impl Broker {
    pub fn op_snapshot(
        self: &Arc<Self>,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        d: &Decision,
    ) -> Result<Done, BrokerError> {
        let w = live_worker(&t, minor, pid)?;
        let owner = t.disk(minor)?.owner.clone();
        let grant = d
            .image
            .clone()
            .ok_or_else(|| BrokerError::failed("policy allowed a snapshot without its child"))?;
        let mut lease = Lease::take(&self.table, t, minor, "snapshot", |_, phase| match phase {
            Phase::Serving { .. } => Ok(()),
            Phase::Paused { .. } => Err(BrokerError::busy(format!(
                "minor {minor} is paused: unpause it first (or snapshot it offline with \
                 `tap-ctl vhd snapshot` while paused)"
            ))),
            Phase::Dead { worker, .. } => Err(dead(*worker, minor)),
            _ => Err(no_image(minor)),
        })?;
        // Whatever happens, a worker that died meanwhile is respawned.
        let r = self.snapshot_leased(&mut lease, &w, &owner, &grant);
        drop(lease);
        self.after_op(minor);
        let (done, parent) = r?;
        let text = format!(
            "minor {minor}: snapshot {} over {}, I/O held {} us",
            done.child,
            parent.display(),
            done.stall_us
        );
        Ok((Reply::Snapshotted(done), text))
    }

    /// The snapshot itself, on the leased minor; returns what was done and
    /// the old leaf's path.
    fn snapshot_leased(
        &self,
        lease: &mut Lease<'_>,
        w: &super::Live,
        owner: &str,
        grant: &ImageGrant,
    ) -> Result<(SnapshotDone, PathBuf), BrokerError> {
        let minor = lease.minor();
        let old = lease
            .phase()
            .image()
            .cloned()
            .ok_or_else(|| BrokerError::failed("serving minor without an image"))?;
        check_leaf(&old, grant, minor)?;
        // What the kernel still holds goes into the old leaf: the snapshot
        // holds every write made before it was asked for.
        if let Some(s) = lease.phase_mut().served_mut() {
            s.device.sync(false).map_err(BrokerError::from)?;
        }
        let deadline = self.open_deadline();
        let leaf = image_open::open_leaf_as_parent(&old.grant, deadline)?;
        if Some(leaf.id) != old.files.first().map(|f| f.0) {
            return Err(BrokerError::failed(format!(
                "{}: the path no longer names the file minor {minor} serves (renamed or \
                 replaced since it was opened): refused",
                old.grant.path.display()
            )));
        }
        let child = image_open::create(grant, deadline)?;
        let child_id = child.id;
        // From here on a failure removes the child (it holds nothing).
        let discard = |why: BrokerError| -> BrokerError {
            match image_open::remove(grant, child_id, deadline) {
                Ok(()) => why,
                Err(e) => BrokerError::new(
                    why.kind,
                    format!(
                        "{}; and removing the unused child failed: {}",
                        why.message, e.message
                    ),
                ),
            }
        };
        if let Err(e) = self.table().claim_files(minor, &[(child_id, true)]) {
            return Err(discard(e));
        }
        let target = Target {
            minor,
            owner,
            worker_pid: w.pid,
            worker_uid: w.uid,
        };
        let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut names = vec![old.grant.path.clone()];
        let mut parents = Vec::new();
        let prepare = ToWorker::SnapshotPrepare {
            child: grant.path.display().to_string(),
            parent: parent_of(&grant.path, &old.grant.path),
        };
        let prepared = conn.with_parents(
            &prepare,
            &[child.file.as_fd(), leaf.file.as_fd()],
            &mut |req| {
                self.resolve_parent(&target, &old.grant.open_as, &mut names, &mut parents, req)
            },
        );
        drop((child, leaf));
        match prepared {
            Ok(FromWorker::Ok) => {}
            Ok(other) => {
                let e = BrokerError::failed(format!(
                    "tapdisk {} answered {} to SnapshotPrepare",
                    w.pid,
                    crate::worker::variant(&other)
                ));
                return Err(discard(e));
            }
            Err(e) => return Err(discard(e.into())),
        }
        // The child is complete: put it on record as the leaf before any
        // guest write can land in it.
        let new = OpenImage {
            spec: ImageSpec {
                kind: ImageKind::Vhd,
                path: grant.path.display().to_string(),
            },
            grant: grant.clone(),
            read_only: false,
            size: old.size,
            chain: std::iter::once(grant.path.display().to_string())
                .chain(old.chain.iter().cloned())
                .collect(),
            files: std::iter::once((child_id, true))
                .chain(old.files.iter().map(|(id, _)| (*id, false)))
                .collect(),
        };
        set_image(lease, new.clone());
        let recorded = self.table().disk_mut(minor).and_then(|disk| {
            disk.persist_as(lease.phase())
                .map_err(|e| BrokerError::failed(format!("writing minor {minor}'s record: {e}")))
        });
        if let Err(e) = recorded {
            set_image(lease, old.clone());
            let _ = conn.call(&ToWorker::SnapshotAbort, &[]);
            return Err(discard(e));
        }
        let switched = conn.call(&ToWorker::SnapshotSwitch, &[]);
        drop(conn);
        let result = match switched {
            // Names only (shown and audited), bounded like an open's.
            Ok(FromWorker::Snapshotted { chain, .. })
                if chain.is_empty() || chain.len() > MAX_CHAIN_DEPTH + 1 =>
            {
                Err(BrokerError::failed(format!(
                    "tapdisk {} reported a chain of {} images after its snapshot",
                    w.pid,
                    chain.len()
                )))
            }
            Ok(FromWorker::Snapshotted { chain, stall_us }) => {
                let chain: Vec<String> = chain.iter().map(|c| crate::worker::clean(c)).collect();
                if let Some(img) = lease.phase_mut().served_mut().map(|s| &mut s.image) {
                    img.chain = chain.clone();
                }
                Ok(SnapshotDone {
                    child: grant.path.display().to_string(),
                    chain,
                    stall_us: stall_us.min(tapjail_common::snapshot::MAX_STALL_US),
                })
            }
            Ok(other) => Err(BrokerError::failed(format!(
                "tapdisk {} answered {} to SnapshotSwitch",
                w.pid,
                crate::worker::variant(&other)
            ))),
            // The worker said no and serves the old chain: back to it.
            Err(e @ WorkerError::Worker { .. }) => {
                set_image(lease, old.clone());
                Err(discard(e.into()))
            }
            // The worker is gone (or was killed for misbehaving): the
            // record names the child, which its successor opens.
            Err(e) => Err(BrokerError::from(e)),
        };
        result.map(|done| (done, old.grant.path.clone()))
    }
}

/// Refuse what cannot be snapshotted online, before anything is created.
fn check_leaf(old: &OpenImage, child: &ImageGrant, minor: Minor) -> Result<(), BrokerError> {
    if old.read_only {
        return Err(BrokerError::invalid(format!(
            "minor {minor} is open read-only (-R): an online snapshot needs a writable leaf"
        )));
    }
    if old.spec.kind != ImageKind::Vhd {
        return Err(BrokerError::invalid(format!(
            "minor {minor} serves a raw (aio) image: an online snapshot needs a VHD leaf \
             (pause, `tap-ctl vhd snapshot -m`, unpause -a)"
        )));
    }
    if child.path == old.grant.path || old.chain.iter().any(|c| Path::new(c) == child.path) {
        return Err(BrokerError::invalid(format!(
            "{} is part of minor {minor}'s chain: name a new file",
            child.path.display()
        )));
    }
    Ok(())
}

fn set_image(lease: &mut Lease<'_>, image: OpenImage) {
    if let Some(s) = lease.phase_mut().served_mut() {
        s.image = image;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locator_goes_up_only_as_far_as_needed() {
        let r = |a: &str, b: &str| relative_to(Path::new(a), Path::new(b));
        assert_eq!(r("/srv/img", "/srv/img/base.vhd"), "./base.vhd");
        assert_eq!(r("/srv/img/snaps", "/srv/img/base.vhd"), "../base.vhd");
        assert_eq!(r("/srv/a", "/srv/b/c/base.vhd"), "../b/c/base.vhd");
        assert_eq!(r("/", "/base.vhd"), "./base.vhd");
    }
}
