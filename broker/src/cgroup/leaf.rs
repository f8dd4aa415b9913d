//! One worker's cgroup, `<root>/<tenant>/<name>`: created with its limits
//! before the worker exists, entered by the worker's child process before
//! `exec` (so no image code ever runs outside it), and removed once empty.

use super::CgroupError;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tapjail_common::stats::CgroupStats;

/// How long a dropped leaf waits for its last process to be gone (it is
/// normally gone already: leaves are dropped after their worker is reaped).
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// A worker's `cpu.weight` while it starts (exec, confinement, the
/// image's headers, the FUSE and loop set-up and the device's first
/// reads), then [`SERVING_CPU_WEIGHT`] once its device is live. A leaf's
/// weight counts only against its siblings, the same tenant's other
/// disks: a disk being created runs ahead of its tenant's running I/O
/// and takes nothing from any other tenant, whose share is its tenant
/// cgroup's `cpu.weight`. In nestvm at 50 disks under fio, placing the
/// workers in cgroups at all took create from 2401 to 636 ms (18x to 4x
/// its idle median); this weight is the next step inside the tenant.
pub const STARTING_CPU_WEIGHT: u32 = 10000;
/// The kernel's default, every serving disk's weight.
pub const SERVING_CPU_WEIGHT: u32 = 100;

/// `TAPJAIL_START_WEIGHT=off` (read once): new disks start at
/// [`SERVING_CPU_WEIGHT`], the old way, to measure one against the other
/// (`bench/control-plane.sh`'s `START_WEIGHT=off`).
fn starting_weight_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TAPJAIL_START_WEIGHT").map_or(true, |v| v != "off"))
}

/// What every worker's cgroup is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub pids_max: u32,
}

/// A worker's cgroup. Shared (`Arc`) by the workers that use it in turn (a
/// respawned worker goes back into its predecessor's); the directory is
/// removed when the last one lets go.
#[derive(Debug)]
pub struct Leaf {
    path: PathBuf,
}

pub(super) fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|e| CgroupError::io(&path, format!("writing {value:?}"), e))
}

/// Write `file` if the kernel has it (memory.swap.max without swap
/// accounting, io.weight without an io scheduler that weighs).
pub(super) fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    match write(dir, file, value) {
        Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

pub(super) fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(CgroupError::io(dir, "creating the cgroup".into(), e))
        }
        _ => Ok(()),
    }
}

impl Leaf {
    /// Create (or reuse) `dir` with `limits`.
    pub(super) fn create(dir: PathBuf, limits: Limits) -> Result<Leaf, CgroupError> {
        mkdir(&dir)?;
        let leaf = Leaf { path: dir };
        write_if_present(&leaf.path, "memory.swap.max", "0")?;
        write(&leaf.path, "memory.max", &limits.memory_max.to_string())?;
        write(&leaf.path, "pids.max", &limits.pids_max.to_string())?;
        if starting_weight_on() {
            write_if_present(&leaf.path, "cpu.weight", &STARTING_CPU_WEIGHT.to_string())?;
        }
        Ok(leaf)
    }

    /// Its worker serves now: down to [`SERVING_CPU_WEIGHT`].
    pub fn serving(&self) -> Result<(), CgroupError> {
        write_if_present(&self.path, "cpu.weight", &SERVING_CPU_WEIGHT.to_string())
    }

    /// A leaf the broker did not create (an adopted worker's).
    pub(super) fn existing(dir: PathBuf) -> Leaf {
        Leaf { path: dir }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `cgroup.procs`, open for writing: a forked child that writes
    /// `0` to it moves itself in (`supervisor::process`).
    pub fn procs(&self) -> Result<OwnedFd, CgroupError> {
        let path = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| CgroupError::io(&path, "opening".into(), e))
    }

    /// Move process `pid` (all its threads) in.
    pub fn enter(&self, pid: u32) -> Result<(), CgroupError> {
        write(&self.path, "cgroup.procs", &pid.to_string())
    }

    /// `populated` of `cgroup.events`: a process (or a descendant's) is in it.
    pub fn populated(&self) -> io::Result<bool> {
        is_populated(&self.path)
    }

    /// Wait until no process is left in it, up to `limit`: `cgroup.events`
    /// wakes a poller (POLLPRI) whenever it changes.
    pub fn wait_empty(&self, limit: Duration) -> io::Result<bool> {
        let f = fs::File::open(self.path.join("cgroup.events"))?;
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 256];
        loop {
            // Reading re-arms the notification, so a change after this
            // read wakes the poll below.
            let n = rustix::io::pread(&f, &mut buf, 0)?;
            if !populated(&String::from_utf8_lossy(&buf[..n]))? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = [rustix::event::PollFd::new(
                &f,
                rustix::event::PollFlags::PRI,
            )];
            let ts = rustix::event::Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Remove it once its last process is gone.
    pub fn remove(&self) -> Result<(), CgroupError> {
        match self.wait_empty(EMPTY_WAIT) {
            Ok(true) => {}
            Ok(false) => {
                return Err(CgroupError::io(
                    &self.path,
                    "removing (still holds processes; the next tap-broker start removes it)".into(),
                    io::Error::from_raw_os_error(libc::EBUSY),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(CgroupError::io(
                    &self.path,
                    "reading cgroup.events".into(),
                    e,
                ))
            }
        }
        match fs::remove_dir(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(CgroupError::io(&self.path, "removing".into(), e))
            }
            _ => Ok(()),
        }
    }

    /// What `tap-ctl stats` shows of it.
    pub fn stats(&self) -> CgroupStats {
        let read = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let num = |f: &str| read(f).trim().parse::<u64>().ok();
        let oom_kills = read("memory.events")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok());
        CgroupStats {
            path: self.path.display().to_string(),
            memory_current: num("memory.current"),
            memory_peak: num("memory.peak"),
            memory_max: num("memory.max"),
            pids_current: num("pids.current"),
            pids_max: num("pids.max"),
            oom_kills,
        }
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!("cgroup: {e}");
        }
    }
}

/// Whether the cgroup at `dir` holds a process.
pub(super) fn is_populated(dir: &Path) -> io::Result<bool> {
    populated(&fs::read_to_string(dir.join("cgroup.events"))?)
}

fn populated(events: &str) -> io::Result<bool> {
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no `populated` in cgroup.events",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_populated_is_read_from_cgroup_events() {
        assert!(populated("populated 1\nfrozen 0\n").unwrap());
        assert!(!populated("populated 0\nfrozen 0\n").unwrap());
        assert!(populated("frozen 0\n").is_err());
    }
}
