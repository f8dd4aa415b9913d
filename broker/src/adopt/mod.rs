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

/// An adopted worker's pidfd, connection, kept fds and answer to Resync.
type Checked = (
    Arc<OwnedFd>,
    WorkerConn,
    Option<Kept>,
    crate::resync::WorkerHas,
);

/// What a worker said when it was adopted.
struct Live {
    has: crate::resync::WorkerHas,
}

impl Broker {
    fn adopt_notice(&self, rule: &str, owner: Option<String>, peer: Option<Peer>, what: String) {
        eprintln!("tap-broker: {rule}: {what}");
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
        for (n, path) in self.state.entries("minors", "tapdev") {
            let Ok(minor) = Minor::new(n) else { continue };
            let Ok(Some(mut lock)) = LockFile::acquire(&path) else {
                continue;
            };
            let Some(rec) = lock.read::<MinorRecord>() else {
                continue;
            };
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
            match self.adopt_minor(minor, &rec, lock, &mut fds, &live, &mut gone) {
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

    /// Kill an adopted worker (and let the supervisor see it go).
    fn kill_adopted(&self, pid: u32, why: &str) {
        let t = self.table();
        if let Some(w) = t.workers.get(&pid) {
            let _ = w.killed.set(format!("not adopted: {why}"));
            let _ = sys::pidfd_kill(w.pidfd.as_fd());
        }
    }

    fn adopt_worker(
        &self,
        rec: &WorkerRecord,
        mut lock: LockFile,
        store: &Arc<FdStore>,
        held: &mut BTreeMap<String, OwnedFd>,
    ) -> Result<(Worker, crate::resync::WorkerHas), (String, LockFile)> {
        match self.check_worker(rec, &mut lock, store, held) {
            Ok((pidfd, conn, kept, has)) => Ok((
                Worker {
                    pid: rec.pid,
                    owner: rec.owner.clone(),
                    uid: rec.uid,
                    pidfd,
                    killed: conn.kill_note(),
                    conn: Arc::new(Mutex::new(conn)),
                    minor: None,
                    exit: None,
                    stopping: false,
                    record: lock,
                    start_time: rec.start_time,
                    kept,
                },
                has,
            )),
            Err(why) => Err((why, lock)),
        }
    }

    fn check_worker(
        &self,
        rec: &WorkerRecord,
        lock: &mut LockFile,
        store: &Arc<FdStore>,
        held: &mut BTreeMap<String, OwnedFd>,
    ) -> Result<Checked, String> {
        let pid = rec.pid;
        let [ctl_name, log_name] = kept_names(pid);
        let ctl = held.remove(&ctl_name);
        let log = held.remove(&log_name);
        let drop_kept = || {
            let _ = store.remove(&ctl_name);
            let _ = store.remove(&log_name);
        };
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                drop_kept();
                return Err(format!("no longer running ({e})"));
            }
        };
        if sys::pidfd_exited(pidfd.as_fd(), 0).unwrap_or(false) {
            drop_kept();
            return Err("no longer running (exited, not yet reaped by its new parent)".into());
        }
        // After the pidfd: if these match now, the pidfd is that process.
        let info = sys::proc_info(pid).map_err(|e| format!("reading /proc/{pid}: {e}"));
        let checked = info.and_then(|info| {
            if info.start_time != rec.start_time || info.uids[0] != rec.uid {
                return Err(format!(
                    "pid {pid} is now another process (start time {} uid {}, recorded {} and {})",
                    info.start_time, info.uids[0], rec.start_time, rec.uid
                ));
            }
            Ok(info)
        });
        let info = match checked {
            Ok(i) => i,
            Err(e) => {
                drop_kept();
                return Err(e);
            }
        };
        // From here on it is our predecessor's worker: whatever fails
        // kills it (clean_predecessor would too).
        let fail = |why: String| {
            drop_kept();
            let _ = sys::pidfd_kill(pidfd.as_fd());
            let _ = sys::pidfd_exited(pidfd.as_fd(), 5000);
            why
        };
        if let Some(what) = confinement_problem(&info, rec.uid) {
            return Err(fail(format!("not confined: {what}")));
        }
        let (Some(ctl), Some(log)) = (ctl, log) else {
            return Err(fail(
                "its control socket or stderr pipe was not kept while no broker ran".into(),
            ));
        };
        let ctl = UnixStream::from(ctl);
        let has = crate::resync::resync(&ctl, self.spawn_cfg.timeout)
            .map_err(|e| fail(format!("control socket: {e}")))?;
        let kept_fds = (ctl.try_clone(), log.try_clone());
        let kept = match (&kept_fds, &self.spawn_cfg.store) {
            (&(Ok(ref c), Ok(ref l)), Some(s)) => Kept::put(
                s,
                &[(ctl_name.clone(), c.as_fd()), (log_name.clone(), l.as_fd())],
            )
            .map_err(|e| eprintln!("tap-broker: tapdisk {pid}: keeping its fds: {e}"))
            .ok(),
            _ => None,
        };
        drop(kept_fds);
        crate::worker_log::forward(std::io::PipeReader::from(log), pid);
        let mut conn = WorkerConn::new(ctl, pid, self.spawn_cfg.timeout)
            .map_err(|e| fail(format!("control socket: {e}")))?
            .with_op_timeout(self.spawn_cfg.op_timeout);
        conn.set_pidfd(pidfd.clone());
        let _ = lock.write(rec);
        Ok((pidfd, conn, kept, has))
    }

    /// Adopt one minor; `Ok(true)` when its worker is gone (respawn rules).
    fn adopt_minor(
        self: &Arc<Self>,
        minor: Minor,
        rec: &MinorRecord,
        lock: LockFile,
        fds: &mut KeptFds,
        live: &BTreeMap<u32, Live>,
        gone: &mut BTreeMap<u32, (WorkerRecord, LockFile)>,
    ) -> Result<bool, String> {
        let bits = State(rec.state);
        let (paused, closed) = (bits.contains(State::PAUSED), bits.contains(State::CLOSED));
        let served = match &rec.served {
            None => None,
            Some(sr) => {
                let mut device = self
                    .devices
                    .adopt(minor, &sr.device, fds)
                    .map_err(|e| format!("its device: {e}"))?;
                device.adopted(rec.worker.filter(|p| live.contains_key(p)));
                // The link must still name the device (a tenant cannot
                // write device_dir, but check rather than trust).
                let link = match rec
                    .link
                    .as_ref()
                    .filter(|l| std::fs::read_link(l).is_ok_and(|t| t == sr.device.node))
                {
                    Some(l) => l.clone(),
                    None => self
                        .publish(minor, &sr.device.node)
                        .map_err(|e| format!("publishing its device: {}", e.message))?,
                };
                Some(Served {
                    image: open_image(sr),
                    device,
                    link,
                })
            }
        };
        if let (Some(pid), Some(s), Some(l)) =
            (rec.worker, &served, rec.worker.and_then(|p| live.get(&p)))
        {
            let has = &l.has;
            let want = format!("{}:{}", s.image.spec.kind, s.image.grant.path.display());
            let agrees = if paused {
                has.image.is_some() && has.paused
            } else {
                has.image.as_deref() == Some(want.as_str()) && has.serving && !has.paused
            };
            if !agrees {
                // The supervisor sees it exit and the respawn rules apply,
                // as for any worker that dies.
                self.kill_adopted(
                    pid,
                    &format!(
                        "it reports {:?} (serving {}, paused {}), the record says {want}",
                        has.image, has.serving, has.paused
                    ),
                );
            }
        }
        // Attached without an image on record: a worker that has one open
        // (a crash between its open and the broker's record of it) is in
        // a state nobody recorded.
        if let (Some(pid), None) = (rec.worker, &served) {
            if let Some(l) = live.get(&pid).filter(|l| l.has.image.is_some()) {
                self.kill_adopted(
                    pid,
                    &format!(
                        "it reports {:?} open, the record says no image",
                        l.has.image
                    ),
                );
            }
        }
        let files = served
            .as_ref()
            .map(|s| s.image.files.clone())
            .unwrap_or_default();
        let image = served.as_ref().map(|s| s.image.spec.to_string());
        let alive = rec.worker.filter(|p| live.contains_key(p));
        let phase = match (rec.worker, alive, served) {
            (None, _, None) => Phase::Allocated,
            (None, _, Some(_)) => {
                return Err("its record has an image but no worker".into());
            }
            (Some(w), Some(_), None) => Phase::Attached { worker: w, closed },
            (Some(w), Some(_), Some(served)) if paused => Phase::Paused { worker: w, served },
            (Some(w), Some(_), Some(served)) => Phase::Serving { worker: w, served },
            (Some(w), None, served) => Phase::Dead {
                worker: w,
                served,
                paused,
                closed,
            },
        };
        let dead = phase.wants_respawn() || matches!(phase, Phase::Dead { .. });
        let mut disk = Disk::new(minor, rec.owner.clone(), lock);
        disk.restarts = rec.restarts;
        if dead {
            disk.deaths.push_back(Instant::now());
        }
        if let Ok(p) = disk.phase_mut() {
            *p = phase;
        }
        disk.persist();
        let owner = rec.owner.clone();
        let mut t = self.table();
        if let Err(e) = t.claim_files(minor, &files) {
            // Another adopted minor claims the same file for writing: the
            // records disagree with each other; take this one down.
            drop(t);
            disk.release();
            return Err(format!("its image files: {}", e.message));
        }
        if let Some(pid) = rec.worker {
            match t.workers.get_mut(&pid) {
                Some(w) => w.minor = Some(minor),
                None => {
                    // Gone while no broker ran: an exited entry, as the
                    // supervisor leaves a worker that died, so `list`,
                    // `destroy` and respawn treat it as any dead worker.
                    if let Some(w) = exited_worker(pid, minor, &owner, gone) {
                        t.workers.insert(pid, w);
                    }
                }
            }
        }
        t.disks.insert(minor, disk);
        drop(t);
        self.adopt_notice(
            "adopt-minor",
            Some(owner),
            None,
            format!(
                "adopted minor {minor}{}{}",
                image.map(|i| format!(" serving {i}")).unwrap_or_default(),
                match (rec.worker, dead) {
                    (Some(p), false) => format!(" with tapdisk {p}"),
                    (Some(p), true) => format!("; its tapdisk {p} is gone: respawn rules apply"),
                    (None, _) => String::new(),
                }
            ),
        );
        Ok(dead)
    }
}

/// A table entry for worker `pid`, which is gone: its record and lock (kept
/// from the refusal), a pidfd of a process that has already been reaped
/// (so nothing can ever be signalled through it) and a control socket
/// whose other end is closed.
fn exited_worker(
    pid: u32,
    minor: Minor,
    owner: &str,
    gone: &mut BTreeMap<u32, (WorkerRecord, LockFile)>,
) -> Option<Worker> {
    let (rec, record) = gone.remove(&pid)?;
    let pidfd = Arc::new(sys::reaped_pidfd().ok()?);
    let (ours, _theirs) = UnixStream::pair().ok()?;
    let conn = WorkerConn::new(ours, pid, std::time::Duration::from_secs(1)).ok()?;
    Some(Worker {
        pid,
        owner: owner.to_string(),
        uid: rec.uid,
        pidfd,
        killed: conn.kill_note(),
        conn: Arc::new(Mutex::new(conn)),
        minor: Some(minor),
        exit: Some(sys::Exit::Unknown),
        stopping: false,
        record,
        start_time: rec.start_time,
        kept: None,
    })
}

fn open_image(sr: &ServedRecord) -> OpenImage {
    OpenImage {
        spec: ImageSpec {
            kind: sr.kind,
            path: sr.path.display().to_string(),
        },
        grant: ImageGrant {
            path: sr.path.clone(),
            root: sr.root.clone(),
            relative: sr.relative.clone(),
            read_only: sr.grant_read_only,
            open_as: tapjail_policy::OpenAs {
                uid: sr.open_uid,
                gid: sr.open_gid,
                owners: sr.owners.clone(),
            },
            shared: sr.shared,
        },
        read_only: sr.read_only,
        size: sr.size,
        chain: sr.chain.clone(),
        files: sr.files.clone(),
    }
}

impl Broker {
    /// Stop serving and exit leaving every disk to a successor (a planned
    /// restart or upgrade): the workers keep serving, the store keeps
    /// their fds, nothing is torn down. The caller exits the process
    /// without dropping the broker (dropping would tear devices down).
    pub fn leave_for_successor(&self) {
        self.quiesce();
        self.flush_denials(true);
        let (disks, workers) = {
            let t = self.table();
            (
                t.disks.len(),
                t.workers.values().filter(|w| w.alive()).count(),
            )
        };
        self.notice(
            Event::BrokerStop,
            None,
            None,
            "handoff",
            format!(
                "tap-broker stopping, leaving {disks} minor(s) and {workers} live tapdisk(s) \
                 to the next tap-broker (SIGINT takes every disk down instead)"
            ),
        );
    }
}
