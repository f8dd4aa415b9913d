//! A broker that starts again takes over every live worker and device its
//! predecessor left (after a crash, a `SIGTERM` restart or an upgrade to a
//! new binary), instead of taking them down.
//!
//! Inputs: the root-only records in `state_dir` (a record whose `flock`
//! can be taken belongs to a broker that is gone) and the fds the store
//! kept (see `tapjail_broker::fdstore`). For each worker: the pidfd is
//! taken first, then `/proc` must show the recorded start time and uid and
//! full confinement ([`confinement_problem`]), its control socket and
//! stderr pipe must have been kept, and it must answer `Resync` (see
//! `crate::resync`). For each minor: its device is rebuilt from the kept
//! fds and checked (`DeviceFactory::adopt`); if it has an image, the
//! worker must report that very image open and served. A worker that fails
//! any check is killed; a minor whose worker is gone keeps its device and
//! follows the respawn rules (respawned, or its I/O failed cleanly with
//! respawn off); a minor whose device cannot be rebuilt is cleaned up as
//! before. Every adoption and refusal is audited.

use crate::broker::Broker;
use crate::device::KeptFds;
use crate::lifecycle::{Phase, Served};
use crate::records::{LockFile, MinorRecord, ServedRecord, WorkerRecord};
use crate::supervisor::process::{confinement_problem, kept_names};
use crate::sys;
use crate::table::{Disk, OpenImage, Worker};
use crate::worker::WorkerConn;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tapjail_broker::fdstore::{FdStore, Kept};
use tapjail_common::audit::{Event, Peer};
use tapjail_common::proto::ImageSpec;
use tapjail_common::state::State;
use tapjail_common::Minor;
use tapjail_policy::ImageGrant;

mod minor;
mod successor;
mod worker;

/// The adoption record of an image served on a live device.
pub fn served_record(s: &Served) -> Option<ServedRecord> {
    let image = &s.image;
    let (device, _) = s.device.handoff()?;
    Some(ServedRecord {
        kind: image.spec.kind,
        path: image.grant.path.clone(),
        root: image.grant.root.clone(),
        relative: image.grant.relative.clone(),
        grant_read_only: image.grant.read_only,
        open_uid: image.grant.open_as.uid,
        open_gid: image.grant.open_as.gid,
        owners: image.grant.open_as.owners.clone(),
        shared: image.grant.shared,
        read_only: image.read_only,
        size: image.size,
        chain: image.chain.clone(),
        files: image.files.clone(),
        device,
    })
}

/// What one start's adoption did.
#[derive(Debug, Default)]
pub struct Adoption {
    pub workers: usize,
    pub disks: usize,
    /// Minors whose worker is gone: the respawn rules apply once the
    /// broker runs ([`Broker::after_op`]).
    pub dead: Vec<Minor>,
}

/// What a worker said when it was adopted.
struct Live {
    has: crate::resync::WorkerHas,
}

impl Broker {
    fn adopt_notice(&self, rule: &str, owner: Option<String>, peer: Option<Peer>, what: String) {
        tracing::info!(tenant = owner.as_deref(), rule, "{rule}: {what}");
        self.notice(Event::Adopt, peer, owner, rule, what);
    }

    /// Take over what a predecessor left, with the fds `held` for it.
    /// Whatever is not adopted stays unlocked in `state_dir`, for
    /// `records::clean_predecessor` to take down afterwards.
    pub fn adopt(self: &Arc<Self>, store: &Arc<FdStore>, held: Vec<(String, OwnedFd)>) -> Adoption {
        let mut held: BTreeMap<String, OwnedFd> = held.into_iter().collect();
        let mut out = Adoption::default();
        let mut live: BTreeMap<u32, Live> = BTreeMap::new();
        // Refused workers (gone, or killed), kept for their minors' entries.
        let mut gone: BTreeMap<u32, (WorkerRecord, LockFile)> = BTreeMap::new();
        for (pid, path) in self.state.entries("workers", "") {
            let Ok(Some(mut lock)) = LockFile::acquire(&path) else {
                continue;
            };
            let Some(rec) = lock
                .read::<WorkerRecord>()
                .filter(|r| u64::from(r.pid) == pid)
            else {
                continue; // clean_predecessor drops it
            };
            let peer = Peer {
                pid: rec.pid,
                uid: rec.uid,
                gid: rec.uid,
            };
            match self.adopt_worker(&rec, lock, store, &mut held) {
                Ok((w, has)) => {
                    self.adopt_notice(
                        "adopt-worker",
                        Some(rec.owner.clone()),
                        Some(peer),
                        format!(
                            "adopted tapdisk {pid} (uid {}, tenant {:?}): confined, {}{}",
                            rec.uid,
                            rec.owner,
                            has.image
                                .as_deref()
                                .map(|i| format!("has {i} open"))
                                .unwrap_or_else(|| "no image open".into()),
                            if has.discarded > 0 {
                                format!(
                                    "; discarded {} stale byte(s) on its control socket",
                                    has.discarded
                                )
                            } else {
                                String::new()
                            }
                        ),
                    );
                    self.table().workers.insert(rec.pid, w);
                    live.insert(rec.pid, Live { has });
                    out.workers += 1;
                }
                Err((why, lock)) => {
                    // Handled here (gone, or killed): not clean_predecessor's.
                    gone.insert(rec.pid, (rec.clone(), lock));
                    self.adopt_notice(
                        "adopt-worker-refused",
                        Some(rec.owner.clone()),
                        Some(peer),
                        format!("tapdisk {pid} not adopted: {why}; it is stopped and its disk follows the respawn rules"),
                    );
                }
            }
        }
        self.wake_supervisor();
        let mut minors = Vec::new();
        for (n, path) in self.state.entries("minors", "tapdev") {
            let Ok(minor) = Minor::new(n) else { continue };
            let Ok(Some(mut lock)) = LockFile::acquire(&path) else {
                continue;
            };
            let Some(rec) = lock.read::<MinorRecord>() else {
                continue;
            };
            minors.push((minor, lock, rec));
        }
        // Read caches first: a clone of one may come before it.
        let caches = crate::xapi::cache_record::read_caches(minors.iter().map(|(m, _, r)| (*m, r)));
        for (minor, lock, rec) in minors {
            let n = minor.get();
            let prefix = format!("m{n}.");
            let names: Vec<String> = held
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            let mut fds = KeptFds(
                names
                    .iter()
                    .filter_map(|k| held.remove(k).map(|fd| (k[prefix.len()..].to_string(), fd)))
                    .collect(),
            );
            let paired = {
                let mut t = self.table();
                crate::xapi::cache_record::adopt_pairing(&mut t, minor, &rec, &caches)
            };
            let adopted = paired
                .and_then(|()| self.adopt_minor(minor, &rec, lock, &mut fds, &live, &mut gone));
            if adopted.is_err() {
                crate::xapi::cached_parent::unpair(&mut self.table(), minor);
            }
            match adopted {
                Ok(dead) => {
                    out.disks += 1;
                    if dead {
                        out.dead.push(minor);
                    }
                }
                Err(why) => {
                    for k in &names {
                        let _ = store.remove(k);
                    }
                    // Its worker, if adopted, serves what nobody manages.
                    if let Some(pid) = rec.worker {
                        self.kill_adopted(pid, "its minor was not adopted");
                    }
                    self.adopt_notice(
                        "adopt-minor-refused",
                        Some(rec.owner.clone()),
                        None,
                        format!("minor {minor} not adopted: {why}; it is cleaned up"),
                    );
                }
            }
        }
        for (_, (_, lock)) in gone {
            lock.release();
        }
        // Adopted workers that no adopted minor claims but whose record
        // says they served one were killed above; the rest are unattached.
        for (name, fd) in held {
            drop(fd);
            let _ = store.remove(&name);
            self.adopt_notice(
                "adopt-fd-dropped",
                None,
                None,
                format!("kept fd {name} belongs to nothing adopted; closed"),
            );
        }
        out
    }

    /// Kill an adopted worker and wait until the supervisor has handled
    /// its exit, so what follows never races that handling. Its minor must
    /// be in the table already: an exit the supervisor sees first, with no
    /// minor to make `Dead`, is forgotten as an unattached worker's.
    fn kill_adopted(&self, pid: u32, why: &str) {
        {
            let t = self.table();
            let Some(w) = t.workers.get(&pid) else {
                return;
            };
            let _ = w.killed.set(format!("not adopted: {why}"));
            let _ = sys::pidfd_kill(w.pidfd.as_fd());
        }
        if !self.wait_exit(pid, std::time::Duration::from_secs(5)) {
            tracing::error!(pid, "tapdisk {pid} survives SIGKILL (D state?)");
        }
    }
}
