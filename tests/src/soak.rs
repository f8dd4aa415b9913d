//! The leak census of the soak tests: everything a create/destroy cycle
//! could leave behind (broker fds and threads, worker and helper processes,
//! zombies, mounts, loop devices, minors, device links, sockets, ublk char
//! devices, cgroups) and the broker's memory, counted from `/proc` and
//! `/sys`, so that a soak can compare before and after and print both.

use crate::{children_of, fd_count, is_broker_helper, is_fd_holder, proc_state, Harness};
use std::fmt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// What one broker (and the host, for what is host-wide) holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub broker_fds: usize,
    pub broker_threads: usize,
    /// Live tapdisk workers among the broker's children.
    pub workers: usize,
    /// Live helpers among them (the fd holder, the image opener).
    pub helpers: usize,
    /// Fds the helpers hold (the fd holder keeps every disk's fds across a
    /// broker restart; FUSE mounts are detached and live only in fds).
    pub helper_fds: usize,
    /// Children that died and were never reaped.
    pub zombies: usize,
    /// Lines of the broker's mount table, and the FUSE ones among them.
    pub mounts: usize,
    pub fuse_mounts: usize,
    /// Loop devices bound to a FUSE disk file (`/disk`, ours; the FUSE +
    /// loop tests take turns, so no neighbour's are counted).
    pub loops: usize,
    /// Minor records in the broker's state dir, links in its device dir,
    /// NBD sockets it made.
    pub minors: usize,
    pub device_links: usize,
    pub nbd_sockets: usize,
    /// ublk char devices on the host (`/sys/class/ublk-char`).
    pub ublk_chars: usize,
    /// Per-disk cgroups under the broker's cgroup root, when the host has
    /// cgroup v2 and the policy gives one (`None`: nothing to count).
    pub cgroups: Option<usize>,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// `Rss:` and `Pss:` of `pid` in KiB, from smaps_rollup.
fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Loop devices whose backing file is a FUSE disk (`/disk`).
fn fuse_loops() -> usize {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| b.trim() == "/disk")
        })
        .count()
}

/// The cgroup directories below `root` (the broker's per-disk cgroups),
/// `None` when the host has no cgroup v2 there.
pub fn cgroup_dirs(root: &Path) -> Option<usize> {
    if !root.join("cgroup.controllers").exists() {
        return None;
    }
    Some(
        std::fs::read_dir(root)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count(),
    )
}

impl Census {
    /// Count what the broker of `h` holds now. `cgroup_root`: the
    /// broker's cgroup root, if its policy sets one.
    pub fn take(h: &Harness, cgroup_root: Option<&Path>) -> Census {
        let broker = h.broker_pid();
        let kids = children_of(broker);
        let zombies = kids.iter().filter(|p| proc_state(**p) == Some('Z')).count();
        let live: Vec<u32> = kids
            .into_iter()
            .filter(|p| proc_state(*p).is_some_and(|s| s != 'Z'))
            .collect();
        let helpers = live.iter().filter(|p| is_broker_helper(**p)).count();
        let mountinfo =
            std::fs::read_to_string(format!("/proc/{broker}/mountinfo")).unwrap_or_default();
        let (rss_kib, pss_kib) = memory_kib(broker);
        Census {
            broker_fds: fd_count(broker),
            broker_threads: entries(Path::new(&format!("/proc/{broker}/task"))),
            workers: live.len() - helpers,
            helpers,
            helper_fds: live
                .iter()
                .filter(|p| is_fd_holder(**p))
                .map(|p| fd_count(*p))
                .sum(),
            zombies,
            mounts: mountinfo.lines().count(),
            fuse_mounts: mountinfo
                .lines()
                .filter(|l| {
                    l.split_once(" - ")
                        .is_some_and(|(_, r)| r.starts_with("fuse"))
                })
                .count(),
            loops: fuse_loops(),
            minors: entries(&h.state.join("minors")),
            device_links: entries(&h.devices),
            nbd_sockets: entries(&h.state.join("nbd")),
            ublk_chars: entries(Path::new("/sys/class/ublk-char")),
            cgroups: cgroup_root.and_then(cgroup_dirs),
            rss_kib,
            pss_kib,
        }
    }

    /// Every count (not memory) that grew from `before` to `self`, as
    /// `name: before -> now`.
    pub fn leaks_since(&self, before: &Census) -> Vec<String> {
        let pairs = [
            ("broker fds", before.broker_fds, self.broker_fds),
            ("broker threads", before.broker_threads, self.broker_threads),
            ("workers", before.workers, self.workers),
            ("helpers", before.helpers, self.helpers),
            ("helper fds", before.helper_fds, self.helper_fds),
            ("zombies", before.zombies, self.zombies),
            ("mounts", before.mounts, self.mounts),
            ("fuse mounts", before.fuse_mounts, self.fuse_mounts),
            ("loop devices", before.loops, self.loops),
            ("minors", before.minors, self.minors),
            ("device links", before.device_links, self.device_links),
            ("nbd sockets", before.nbd_sockets, self.nbd_sockets),
            ("ublk char devices", before.ublk_chars, self.ublk_chars),
            (
                "cgroups",
                before.cgroups.unwrap_or(0),
                self.cgroups.unwrap_or(0),
            ),
        ];
        pairs
            .iter()
            .filter(|(_, b, n)| n > b)
            .map(|(name, b, n)| format!("{name}: {b} -> {n}"))
            .collect()
    }
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "broker_fds={} broker_threads={} workers={} helpers={} helper_fds={} zombies={} mounts={} \
             fuse_mounts={} loops={} minors={} device_links={} nbd_sockets={} ublk_chars={} \
             cgroups={} rss_kib={} pss_kib={}",
            self.broker_fds,
            self.broker_threads,
            self.workers,
            self.helpers,
            self.helper_fds,
            self.zombies,
            self.mounts,
            self.fuse_mounts,
            self.loops,
            self.minors,
            self.device_links,
            self.nbd_sockets,
            self.ublk_chars,
            self.cgroups.map_or("-".to_string(), |c| c.to_string()),
            self.rss_kib,
            self.pss_kib
        )
    }
}

/// Write 4 KiB of `seed`'s pattern at `off` of block device `dev` with
/// O_DIRECT, read it back the same way and compare: the cycle's "little
/// I/O", which must reach the worker and come back from it.
pub fn direct_round_trip(dev: &Path, off: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut w = tapjail_testsupport::Aligned::new(4096);
    w.buf()
        .copy_from_slice(&tapjail_testsupport::pattern(4096, seed));
    f.write_all_at(w.buf(), off)?;
    let mut r = tapjail_testsupport::Aligned::new(4096);
    f.read_exact_at(r.buf(), off)?;
    if r.buf() != w.buf() {
        return Err(std::io::Error::other(format!(
            "{}: 4 KiB at {off} read back differently",
            dev.display()
        )));
    }
    Ok(())
}

/// Cycle count for a soak: `TAPJAIL_SOAK_CYCLES` if set, else `default`.
pub fn cycles(default: u64) -> u64 {
    std::env::var("TAPJAIL_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
