//! What the broker keeps in `state_dir`, so that several brokers never share
//! a minor and a restarted broker can clean up after a dead one.
//!
//! ```text
//! state_dir/minors/tapdevN.lock   flock'd while minor N is allocated;
//!                                 holds a JSON MinorRecord
//! state_dir/workers/PID.lock      flock'd while worker PID lives;
//!                                 holds a JSON WorkerRecord
//! state_dir/nbd/tapdevN.sock      NBD frontends' sockets (device/nbd.rs)
//! ```
//!
//! A lock is held by an open file description, so it disappears with the
//! broker that held it, however it died. A file whose lock can be taken
//! is therefore a dead broker's leftover: [`clean_predecessor`] kills the
//! orphaned worker it names (if that very process still runs: pid and
//! start time must both match), removes the device and the record. A
//! broker never adopts a predecessor's disks: their control sockets died
//! with it, so the disks could not be managed anyway.

use crate::device::factory::DeviceFactory;
use crate::sys;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tapjail_common::Minor;

/// What a minor's lock file says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinorRecord {
    pub minor: u16,
    pub owner: String,
    pub worker: Option<u32>,
    pub image: Option<String>,
    pub frontend: Option<String>,
    pub link: Option<PathBuf>,
    /// blktap state bits.
    #[serde(default)]
    pub state: u32,
    #[serde(default)]
    pub restarts: u32,
    /// What a successor needs to take the served image and its device
    /// over (see `crate::adopt`).
    #[serde(default)]
    pub served: Option<ServedRecord>,
    /// The disk's own limits set at runtime (`tap-ctl throttle -m`), for
    /// a successor (see `crate::qos_records`).
    #[serde(default)]
    pub io: Option<tapjail_common::qos::IoLimits>,
    /// The disk's file secondary (`-2 vhd:PATH`), for a successor that
    /// respawns its tapdisk (see `crate::mirror::record`).
    #[serde(default)]
    pub secondary: Option<crate::mirror::record::FileRecord>,
}

/// An image served on a live device, as a successor adopts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub kind: tapjail_common::proto::ImageKind,
    /// The grant the image was opened by (to open it again on respawn).
    pub path: PathBuf,
    pub root: PathBuf,
    pub relative: PathBuf,
    pub grant_read_only: bool,
    /// Who the grant opens as (fsuid/fsgid) and who may own the file.
    #[serde(default)]
    pub open_uid: u32,
    #[serde(default)]
    pub open_gid: u32,
    #[serde(default)]
    pub owners: Vec<u32>,
    /// A `shared_readonly` root's grant.
    #[serde(default)]
    pub shared: bool,
    pub read_only: bool,
    pub size: u64,
    pub chain: Vec<String>,
    /// (device, inode) of every file of the chain, and whether writable.
    pub files: Vec<((u64, u64), bool)>,
    pub device: crate::device::Handoff,
}

/// What a worker's lock file says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub pid: u32,
    pub start_time: u64,
    pub uid: u32,
    pub owner: String,
}

/// An exclusively `flock`ed file, removed again on [`LockFile::release`].
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Lock `path`, creating it; `None` if another process holds it.
    pub fn acquire(path: &Path) -> io::Result<Option<LockFile>> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            if !sys::try_lock(file.as_fd())? {
                return Ok(None);
            }
            // Someone may have released (unlinked) the file between our
            // open and our lock; then we locked an orphan inode. Retry.
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() == file.metadata()?.ino() => {
                    return Ok(Some(LockFile {
                        file,
                        path: path.to_path_buf(),
                    }))
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&bytes)
    }

    pub fn read<T: DeserializeOwned>(&mut self) -> Option<T> {
        let mut buf = Vec::new();
        self.file.seek(SeekFrom::Start(0)).ok()?;
        (&mut self.file)
            .take(64 * 1024)
            .read_to_end(&mut buf)
            .ok()?;
        serde_json::from_slice(&buf).ok()
    }

    /// Unlink while still locked, then unlock by closing.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The layout of `state_dir`.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn create(root: &Path) -> io::Result<StateDir> {
        for dir in [
            root.to_path_buf(),
            root.join("minors"),
            root.join("workers"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// `state_dir/NAME`, for state kept beside the records (CBT logs).
    pub fn sub_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn minor_path(&self, minor: Minor) -> PathBuf {
        self.root
            .join("minors")
            .join(format!("{}.lock", minor.device_name()))
    }

    fn worker_path(&self, pid: u32) -> PathBuf {
        self.root.join("workers").join(format!("{pid}.lock"))
    }

    /// `None` if another broker holds `minor`.
    pub fn lock_minor(&self, minor: Minor) -> io::Result<Option<LockFile>> {
        LockFile::acquire(&self.minor_path(minor))
    }

    pub fn lock_worker(&self, pid: u32) -> io::Result<LockFile> {
        LockFile::acquire(&self.worker_path(pid))?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("worker record for pid {pid} is locked by another broker"),
            )
        })
    }

    /// Lock files present in `sub` (for cleanup), as (number, path).
    pub fn entries(&self, sub: &str, prefix: &str) -> Vec<(u64, PathBuf)> {
        let Ok(dir) = std::fs::read_dir(self.root.join(sub)) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, PathBuf)> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let n = name
                    .to_str()?
                    .strip_prefix(prefix)?
                    .strip_suffix(".lock")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        out.sort();
        out
    }
}

/// What [`clean_predecessor`] did and what it could not do.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub actions: Vec<String>,
    pub problems: Vec<String>,
}

/// Remove what brokers that died left in `state`: kill their orphaned
/// workers, tear down their devices, free their minors. Files still locked
/// belong to a live broker and are left alone.
pub fn clean_predecessor(state: &StateDir, devices: &DeviceFactory, device_dir: &Path) -> Cleanup {
    let mut c = Cleanup::default();
    for (pid, path) in state.entries("workers", "") {
        let lock = match LockFile::acquire(&path) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                c.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let mut lock = lock;
        let rec: Option<WorkerRecord> = lock.read();
        match rec {
            Some(rec) if u64::from(rec.pid) == pid => match kill_orphan(&rec) {
                Ok(Some(msg)) => c.actions.push(msg),
                Ok(None) => c.actions.push(format!(
                    "dropped record of tapdisk {pid} (no longer running)"
                )),
                Err(e) => c.problems.push(format!("tapdisk {pid}: {e}")),
            },
            _ => c.actions.push(format!(
                "dropped unreadable worker record {}",
                path.display()
            )),
        }
        lock.release();
    }
    for (n, path) in state.entries("minors", "tapdev") {
        let Ok(minor) = Minor::new(n) else { continue };
        let mut lock = match LockFile::acquire(&path) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                c.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let rec: MinorRecord = lock.read().unwrap_or_default();
        for r in devices.cleanup_stale(minor) {
            match r {
                Ok(a) => c.actions.push(a),
                Err(p) => c.problems.push(p),
            }
        }
        let link = device_dir.join(minor.device_name());
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            match std::fs::remove_file(&link) {
                Ok(()) => c.actions.push(format!("removed stale {}", link.display())),
                Err(e) => c.problems.push(format!("{}: {e}", link.display())),
            }
        }
        c.actions.push(format!(
            "freed minor {minor} left by a previous broker (tenant {:?}{})",
            rec.owner,
            rec.image
                .map(|i| format!(", image {i}"))
                .unwrap_or_default()
        ));
        lock.release();
    }
    c
}

/// Kill the process `rec` describes if it is still that process.
fn kill_orphan(rec: &WorkerRecord) -> io::Result<Option<String>> {
    let pidfd = match sys::pidfd_open(rec.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Identity check after taking the pidfd: if these match now, the pidfd
    // refers to that very process (a pid is not reused while it runs).
    let info = match sys::proc_info(rec.pid) {
        Ok(i) => i,
        Err(_) => return Ok(None),
    };
    if info.start_time != rec.start_time || info.uids[0] != rec.uid {
        return Ok(None);
    }
    sys::pidfd_kill(pidfd.as_fd())?;
    if !sys::pidfd_exited(pidfd.as_fd(), 5000)? {
        return Err(io::Error::other("still running 5 s after SIGKILL"));
    }
    Ok(Some(format!(
        "killed orphaned tapdisk {} (uid {}, tenant {:?})",
        rec.pid, rec.uid, rec.owner
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_excludes_second_holder_and_release_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let mut a = LockFile::acquire(&p).unwrap().unwrap();
        assert!(LockFile::acquire(&p).unwrap().is_none());
        a.write(&WorkerRecord {
            pid: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a.read::<WorkerRecord>().unwrap().pid, 5);
        a.release();
        assert!(!p.exists());
        assert!(LockFile::acquire(&p).unwrap().is_some());
    }

    #[test]
    fn clean_predecessor_frees_unlocked_minors_and_kills_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let devdir = tempfile::tempdir().unwrap();
        let state = StateDir::create(dir.path()).unwrap();
        let devices = DeviceFactory::new(
            tapjail_policy::FrontendChoice::Nbd,
            dir.path(),
            Path::new("/dev"),
        )
        .unwrap();
        // A "dead broker's" minor 4 and worker (a sleep we own).
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        {
            let mut l = state.lock_minor(Minor::new(4).unwrap()).unwrap().unwrap();
            l.write(&MinorRecord {
                minor: 4,
                owner: "alice".into(),
                ..Default::default()
            })
            .unwrap();
            std::os::unix::fs::symlink("/nonexistent", devdir.path().join("tapdev4")).unwrap();
            let mut w = state.lock_worker(child.id()).unwrap();
            w.write(&WorkerRecord {
                pid: child.id(),
                start_time: sys::proc_start_time(child.id()).unwrap(),
                uid: 0,
                owner: "alice".into(),
            })
            .unwrap();
            // Dropping without release = the broker died.
        }
        // A live broker's minor 5 stays.
        let _live = state.lock_minor(Minor::new(5).unwrap()).unwrap().unwrap();
        let c = clean_predecessor(&state, &devices, devdir.path());
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert!(
            c.actions
                .iter()
                .any(|a| a.contains("killed orphaned tapdisk")),
            "{:?}",
            c.actions
        );
        assert!(
            c.actions.iter().any(|a| a.contains("freed minor 4")),
            "{:?}",
            c.actions
        );
        assert!(!c.actions.iter().any(|a| a.contains("minor 5")));
        assert!(!devdir.path().join("tapdev4").exists());
        assert!(state.lock_minor(Minor::new(4).unwrap()).unwrap().is_some());
        assert!(state.lock_minor(Minor::new(5).unwrap()).unwrap().is_none());
        let st = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn clean_predecessor_never_kills_a_recycled_pid() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::create(dir.path()).unwrap();
        let devices = DeviceFactory::new(
            tapjail_policy::FrontendChoice::Nbd,
            dir.path(),
            Path::new("/dev"),
        )
        .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        {
            let mut w = state.lock_worker(child.id()).unwrap();
            w.write(&WorkerRecord {
                pid: child.id(),
                start_time: 1, // not this process's start time
                uid: 0,
                owner: "a".into(),
            })
            .unwrap();
        }
        let c = clean_predecessor(&state, &devices, dir.path());
        assert!(
            c.actions[0].contains("no longer running"),
            "{:?}",
            c.actions
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the unrelated process lives"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
