//! The broker's tables: minors ("disks") and workers, who owns them, what
//! is open where. One mutex guards the whole table; slow work (talking to a
//! worker, creating devices) happens with the mutex released and the minor
//! leased ([`crate::lifecycle::Lease`]), so concurrent requests on it are
//! refused rather than interleaved.

use crate::error::BrokerError;
pub use crate::lifecycle::{Disk, FileId, OpenImage};
use crate::records::{LockFile, WorkerRecord};
use crate::sys::Exit;
use crate::worker::WorkerConn;
use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use tapjail_common::proto::ListEntry;
use tapjail_common::Minor;
use tapjail_policy::{BrokerView, Scope};

/// A worker process.
#[derive(Debug)]
pub struct Worker {
    pub pid: u32,
    pub owner: String,
    pub uid: u32,
    pub pidfd: Arc<OwnedFd>,
    pub conn: Arc<Mutex<WorkerConn>>,
    pub minor: Option<Minor>,
    /// Set by the supervisor when the process has been reaped.
    pub exit: Option<Exit>,
    /// The broker asked it to go (detach, destroy, shutdown).
    pub stopping: bool,
    pub record: LockFile,
    pub start_time: u64,
    /// Why the broker killed it (protocol violation, missed deadline), if
    /// it did: named in the audit line of its exit.
    pub killed: Arc<std::sync::OnceLock<String>>,
    /// Its fds in the store while it is in the table (see `fdstore`).
    pub kept: Option<tapjail_broker::fdstore::Kept>,
    /// Its cgroup (shared with a respawned successor; removed with the last).
    pub cgroup: Option<Arc<tapjail_broker::cgroup::Leaf>>,
}

impl Worker {
    pub fn record(&self) -> WorkerRecord {
        WorkerRecord {
            pid: self.pid,
            start_time: self.start_time,
            uid: self.uid,
            owner: self.owner.clone(),
        }
    }

    pub fn alive(&self) -> bool {
        self.exit.is_none()
    }
}

/// A spawn in progress: counts against the tenant's limit and holds its uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSpawn {
    pub owner: String,
    pub uid: u32,
}

#[derive(Debug, Default)]
pub struct Table {
    pub disks: BTreeMap<Minor, Disk>,
    pub workers: BTreeMap<u32, Worker>,
    pub pending: Vec<PendingSpawn>,
    /// Files open (or being opened) on some minor: (minor, writable).
    pub files: BTreeMap<FileId, Vec<(Minor, bool)>>,
    /// `-e` clones of a read cache (`crate::xapi::cached_parent`): clone
    /// minor → (read cache minor, cache file). Their claims on that file
    /// coexist: the clone only reads what the cache's worker writes.
    pub cache_readers: BTreeMap<Minor, (Minor, FileId)>,
    /// Where the next worker uid is looked for (`supervisor::uids`).
    pub uid_picker: crate::supervisor::uids::UidPicker,
}

impl BrokerView for Table {
    fn minor_owner(&self, minor: Minor) -> Option<&str> {
        self.disks.get(&minor).map(|d| d.owner.as_str())
    }
    fn worker_owner(&self, pid: u32) -> Option<&str> {
        self.workers.get(&pid).map(|w| w.owner.as_str())
    }
    fn minors_of(&self, tenant: &str) -> usize {
        self.disks.values().filter(|d| d.owner == tenant).count()
    }
    fn workers_of(&self, tenant: &str) -> usize {
        self.workers.values().filter(|w| w.owner == tenant).count()
            + self.pending.iter().filter(|p| p.owner == tenant).count()
    }
}

impl Table {
    pub fn disk(&self, minor: Minor) -> Result<&Disk, BrokerError> {
        self.disks
            .get(&minor)
            .ok_or_else(|| BrokerError::not_found(format!("minor {minor} is not allocated")))
    }

    pub fn disk_mut(&mut self, minor: Minor) -> Result<&mut Disk, BrokerError> {
        self.disks
            .get_mut(&minor)
            .ok_or_else(|| BrokerError::not_found(format!("minor {minor} is not allocated")))
    }

    pub fn worker(&self, pid: u32) -> Result<&Worker, BrokerError> {
        self.workers
            .get(&pid)
            .ok_or_else(|| BrokerError::not_found(format!("no tapdisk with pid {pid}")))
    }

    /// The worker attached to `minor`, checking `-p` if given.
    pub fn attached(&self, minor: Minor, pid: Option<u32>) -> Result<&Worker, BrokerError> {
        let Some(wpid) = self.disk(minor)?.phase()?.worker() else {
            return Err(BrokerError::busy(format!(
                "minor {minor} has no tapdisk attached (attach one with `tap-ctl attach -m {minor} -p PID`)"
            )));
        };
        if let Some(p) = pid {
            if p != wpid {
                return Err(BrokerError::invalid(format!(
                    "minor {minor} is attached to tapdisk {wpid}, not {p}"
                )));
            }
        }
        self.worker(wpid)
    }

    /// Whether worker `pid` has exited without the broker asking it to:
    /// a phase naming it is then `Dead`.
    pub fn died_unasked(&self, pid: u32) -> bool {
        self.workers
            .get(&pid)
            .is_some_and(|w| !w.alive() && !w.stopping)
    }

    /// Uids held by live or pending workers.
    pub fn worker_uids(&self) -> HashSet<u32> {
        self.workers
            .values()
            .filter(|w| w.alive())
            .map(|w| w.uid)
            .chain(self.pending.iter().map(|p| p.uid))
            .collect()
    }

    /// Register the files of an image being opened on `minor`; refuse if
    /// that would let two minors write one file, or one write what another
    /// reads.
    pub fn claim_files(
        &mut self,
        minor: Minor,
        files: &[(FileId, bool)],
    ) -> Result<(), BrokerError> {
        for (id, rw) in files {
            if let Some(users) = self.files.get(id) {
                let cache_pair = |m: Minor| {
                    self.cache_readers.get(&minor) == Some(&(m, *id))
                        || self.cache_readers.get(&m) == Some(&(minor, *id))
                };
                if let Some((m, other_rw)) =
                    users.iter().find(|(m, _)| *m != minor && !cache_pair(*m))
                {
                    if *rw || *other_rw {
                        return Err(BrokerError::busy(format!(
                            "that image file is already open{} on minor {m}",
                            if *other_rw { " for writing" } else { "" }
                        )));
                    }
                }
            }
        }
        for (id, rw) in files {
            self.files.entry(*id).or_default().push((minor, *rw));
        }
        Ok(())
    }

    /// Make `minor`'s claims exactly `files` (what its phase holds), once
    /// an operation on it ends, however it ended.
    pub fn set_files(&mut self, minor: Minor, files: &[(FileId, bool)]) {
        self.files.retain(|_, users| {
            users.retain(|(m, _)| *m != minor);
            !users.is_empty()
        });
        for (id, rw) in files {
            self.files.entry(*id).or_default().push((minor, *rw));
        }
    }

    pub fn release_files(&mut self, minor: Minor, files: &[(FileId, bool)]) {
        for (id, rw) in files {
            if let Some(users) = self.files.get_mut(id) {
                if let Some(pos) = users.iter().position(|u| *u == (minor, *rw)) {
                    users.remove(pos);
                }
                if users.is_empty() {
                    self.files.remove(id);
                }
            }
        }
    }

    /// `tap-ctl list` rows visible to `tenant` under `scope`: workers (with
    /// the minor they serve) by pid, then minors without a worker.
    pub fn list(&self, tenant: &str, scope: Scope) -> Vec<ListEntry> {
        let visible = |owner: &str| scope == Scope::All || owner == tenant;
        let mut rows = Vec::new();
        for w in self.workers.values().filter(|w| visible(&w.owner)) {
            let disk = w.minor.and_then(|m| self.disks.get(&m));
            rows.push(match disk {
                Some(d) => row(d, d.shown(), Some(w.pid)),
                None => ListEntry {
                    pid: Some(w.pid),
                    minor: None,
                    state: None,
                    image: None,
                    read_only: false,
                    frontend: None,
                    device: None,
                    restarts: 0,
                    mirror: None,
                },
            });
        }
        for d in self.disks.values().filter(|d| visible(&d.owner)) {
            let shown = d.shown();
            if shown.worker.is_none() {
                rows.push(row(d, shown, None));
            }
        }
        rows
    }
}

fn row(d: &Disk, s: crate::lifecycle::Shown, pid: Option<u32>) -> ListEntry {
    ListEntry {
        pid,
        minor: Some(d.minor),
        // blktap shows a state only for minors a tapdisk serves.
        state: pid.map(|_| s.state),
        image: s.image,
        read_only: s.read_only,
        frontend: s.frontend,
        device: s.link.as_ref().map(|l| l.display().to_string()),
        restarts: d.restarts,
        // Filled in from the broker's mirror records (`Mirrors::fill_list`).
        mirror: None,
    }
}
