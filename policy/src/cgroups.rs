//! The cgroup v2 keys of `policy.toml`: where the broker's subtree is, what
//! each worker's cgroup is limited to, and whether a host without usable
//! cgroups may still serve.
//!
//! Each worker runs in `<cgroup_root>/<tenant>/<minor>`; these keys only
//! say what to write there (the broker does the writing).

use crate::config::{Checker, FrontendChoice};
use serde::Deserialize;
use std::path::PathBuf;
use toml::Spanned;

/// Whether cgroups are needed (`cgroups = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Use them where the host has them; otherwise log and audit why not,
    /// and serve without (a host with cgroup v1 only still works).
    Auto,
    /// Refuse to start without a usable, delegated cgroup v2 subtree.
    Required,
    /// Never touch cgroups.
    Off,
}

impl CgroupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::Auto => "auto",
            CgroupMode::Required => "required",
            CgroupMode::Off => "off",
        }
    }
}

/// Defaults. The memory figures come from `e2e cgroup::` measurements
/// (memory.peak of workers of each frontend under I/O; see bench/README.md).
pub mod defaults {
    /// memory.max of a worker, MiB: RLIMIT_MEMLOCK (all of a worker's
    /// memory is locked) plus room for what the kernel charges besides:
    /// page tables, io_uring rings, slab, and the page cache of the image
    /// file, which the kernel reclaims within memory.max (dirty pages are
    /// throttled per cgroup and written back first).
    ///
    /// Measured in nestvm (`e2e cgroup_bounds::`, memory.stat of busy
    /// ublk and FUSE workers): on ext4 a worker peaks at 50-80 MiB with no
    /// limit near, its file pages (up to 16 MiB dirty) being the only part
    /// that grows with I/O. The EIO once seen at + 64 was not page cache:
    /// the image lay on tmpfs, whose pages (memory.stat `shmem`) are
    /// charged to the worker that writes them and cannot be reclaimed
    /// without swap. An image on tmpfs needs a memory.max that holds the
    /// data written to it (tap-broker warns at open).
    pub const WORKER_MEMORY_MAX_MIB: u64 = crate::config::defaults::WORKER_MEMLOCK_MIB + 64;
    /// pids.max of a worker (ublk, FUSE + loop, and `auto`): its own
    /// threads (FUSE: 16 serving threads and 2 more; ublk about 9) and
    /// io_uring's io-wq workers, which count here. The worker caps io-wq
    /// per ring (`IORING_REGISTER_IOWQ_MAX_WORKERS`: one bounded and one
    /// unbounded per image-file ring user, four and one per ublk queue), so
    /// its tasks stay under about 51 (FUSE) and 28 (ublk) at worst; the
    /// busiest measured 34 and 17. Without the caps a kernel sized io-wq
    /// from the CPU count and RLIMIT_NPROC, and an io-wq worker refused by
    /// pids.max fails its request (ECANCELED, an EIO to the guest).
    pub const WORKER_PIDS_MAX: u32 = 64;
    /// pids.max of an NBD worker (`frontend = "nbd"` or `"nbd-kernel"`):
    /// 32 I/O threads and 2 paced lanes, each with its io-wq cap, plus a
    /// reader and a writer thread per client (up to 32).
    pub const NBD_WORKER_PIDS_MAX: u32 = 160;
    /// cgroup v2's own default weight (cpu.weight and io.weight).
    pub const WEIGHT: u32 = 100;

    /// The default pids.max for workers of `frontend`.
    pub fn pids_max(frontend: crate::config::FrontendChoice) -> u32 {
        use crate::config::FrontendChoice as F;
        match frontend {
            F::Nbd | F::NbdKernel => NBD_WORKER_PIDS_MAX,
            F::Auto | F::Ublk | F::Fuse => WORKER_PIDS_MAX,
        }
    }
}

/// Least memory.max above RLIMIT_MEMLOCK, MiB: below it a worker that
/// locks all it may is killed by the kernel instead of told by mlock.
pub const MIN_MEMORY_ABOVE_MEMLOCK_MIB: u64 = 16;
/// Bounds of `worker_pids_max`: fewer cannot run a worker's threads.
pub const PIDS_MAX_RANGE: (i64, i64) = (16, 4096);
/// Bounds of cpu.weight and io.weight (the kernel's).
pub const WEIGHT_RANGE: (i64, i64) = (1, 10_000);

/// The broker-wide cgroup settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPolicy {
    pub mode: CgroupMode,
    /// The subtree the broker owns; `None`: a `tapjail` child of the
    /// cgroup the broker runs in (systemd gives it one with `Delegate=yes`).
    pub root: Option<PathBuf>,
    /// memory.max of each worker, bytes (memory.swap.max is 0).
    pub memory_max: u64,
    /// pids.max of each worker.
    pub pids_max: u32,
}

/// A tenant's share of CPU and disk time, against the other tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCgroup {
    pub cpu_weight: u32,
    pub io_weight: u32,
}

impl Default for TenantCgroup {
    fn default() -> Self {
        TenantCgroup {
            cpu_weight: defaults::WEIGHT,
            io_weight: defaults::WEIGHT,
        }
    }
}

/// The top-level keys as read (with their spans).
pub(crate) struct RawCgroupKeys {
    pub cgroups: Option<Spanned<CgroupMode>>,
    pub cgroup_root: Option<Spanned<String>>,
    pub worker_memory_max_mib: Option<Spanned<i64>>,
    pub worker_pids_max: Option<Spanned<i64>>,
}

pub(crate) fn build(
    c: &mut Checker<'_>,
    raw: RawCgroupKeys,
    memlock_mib: u64,
    frontend: FrontendChoice,
) -> CgroupPolicy {
    let mode = raw.cgroups.map_or(CgroupMode::Auto, |m| *m.get_ref());
    let root = raw.cgroup_root.map(|r| {
        let span = r.span();
        let p = c.abs_path("cgroup_root", Some(r), "/sys/fs/cgroup/tapjail");
        if !p.starts_with("/sys/fs/cgroup") || p == std::path::Path::new("/sys/fs/cgroup") {
            c.at(
                span,
                format!(
                    "cgroup_root {} must be a directory below /sys/fs/cgroup (a cgroup of its own, \
                     not the root)",
                    p.display()
                ),
            );
        }
        p
    });
    let least = memlock_mib + MIN_MEMORY_ABOVE_MEMLOCK_MIB;
    let memory_max_mib = match raw.worker_memory_max_mib {
        None => defaults::WORKER_MEMORY_MAX_MIB.max(memlock_mib + 64),
        Some(m) => {
            let v = c.int_in(
                "worker_memory_max_mib",
                &m,
                1,
                crate::config::MAX_WORKER_MEMLOCK_MIB as i64 * 2,
                least,
            );
            if v < least {
                c.at(
                    m.span(),
                    format!(
                        "worker_memory_max_mib = {v} leaves no room above worker_memlock_mib = \
                         {memlock_mib}: a worker locks all its memory, and the kernel charges more \
                         (page tables, rings); use at least {least}"
                    ),
                );
            }
            v
        }
    };
    let default_pids = defaults::pids_max(frontend);
    let pids_max = raw.worker_pids_max.map_or(default_pids, |m| {
        c.int_in(
            "worker_pids_max",
            &m,
            PIDS_MAX_RANGE.0,
            PIDS_MAX_RANGE.1,
            default_pids,
        )
    });
    CgroupPolicy {
        mode,
        root,
        memory_max: memory_max_mib * 1024 * 1024,
        pids_max,
    }
}

pub(crate) fn tenant(
    c: &mut Checker<'_>,
    cpu_weight: Option<Spanned<i64>>,
    io_weight: Option<Spanned<i64>>,
) -> TenantCgroup {
    let w = |c: &mut Checker<'_>, key: &str, v: Option<Spanned<i64>>| {
        v.map_or(defaults::WEIGHT, |v| {
            c.int_in(key, &v, WEIGHT_RANGE.0, WEIGHT_RANGE.1, defaults::WEIGHT)
        })
    };
    TenantCgroup {
        cpu_weight: w(c, "cpu_weight", cpu_weight),
        io_weight: w(c, "io_weight", io_weight),
    }
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    const T: &str = "[[tenant]]\nname = \"a\"\nuids = [1]\n";

    fn errs(text: &str) -> String {
        Policy::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn cgroup_keys_default_to_auto_with_limits_sized_above_memlock() {
        let p = Policy::parse(T).unwrap();
        assert_eq!(p.cgroup.mode, super::CgroupMode::Auto);
        assert_eq!(p.cgroup.root, None);
        assert!(p.cgroup.memory_max >= p.worker_memlock + (16 << 20));
        assert_eq!(p.cgroup.pids_max, super::defaults::WORKER_PIDS_MAX);
        assert_eq!(p.tenants[0].cgroup, super::TenantCgroup::default());
    }

    #[test]
    fn cgroup_defaults_are_tight_bounds_sized_per_frontend() {
        let p = Policy::parse(T).unwrap();
        assert_eq!(p.cgroup.memory_max, p.worker_memlock + (64 << 20));
        assert_eq!(p.cgroup.memory_max, 128 << 20);
        for (frontend, pids) in [
            ("ublk", 64),
            ("fuse", 64),
            ("auto", 64),
            ("nbd", 160),
            ("nbd-kernel", 160),
        ] {
            let p = Policy::parse(&format!("frontend = {frontend:?}\n{T}")).unwrap();
            assert_eq!(p.cgroup.pids_max, pids, "{frontend}");
        }
        let p = Policy::parse(&format!("frontend = \"nbd\"\nworker_pids_max = 40\n{T}")).unwrap();
        assert_eq!(p.cgroup.pids_max, 40, "an explicit value wins");
        let p = Policy::parse(&format!("worker_memlock_mib = 200\n{T}")).unwrap();
        assert_eq!(p.cgroup.memory_max, (200 + 64) << 20, "sized from memlock");
    }

    #[test]
    fn cgroup_keys_are_read() {
        let p = Policy::parse(&format!(
            "cgroups = \"required\"\ncgroup_root = \"/sys/fs/cgroup/tj\"\nworker_memlock_mib = 32\n\
             worker_memory_max_mib = 100\nworker_pids_max = 40\n{T}cpu_weight = 500\nio_weight = 7\n"
        ))
        .unwrap();
        assert_eq!(p.cgroup.mode, super::CgroupMode::Required);
        assert_eq!(p.cgroup.root.as_deref(), Some("/sys/fs/cgroup/tj".as_ref()));
        assert_eq!(p.cgroup.memory_max, 100 << 20);
        assert_eq!(p.cgroup.pids_max, 40);
        assert_eq!(p.tenants[0].cgroup.cpu_weight, 500);
        assert_eq!(p.tenants[0].cgroup.io_weight, 7);
    }

    #[test]
    fn cgroup_keys_out_of_range_are_refused_with_their_line() {
        let e = errs(&format!("{T}cpu_weight = 0\nio_weight = 10001\n"));
        assert!(
            e.contains("line 4") && e.contains("cpu_weight = 0 is out of range (1..=10000)"),
            "{e}"
        );
        assert!(
            e.contains("line 5") && e.contains("io_weight = 10001"),
            "{e}"
        );
        let e = errs(&format!("worker_pids_max = 3\n{T}"));
        assert!(
            e.contains("line 1") && e.contains("worker_pids_max = 3 is out of range (16..=4096)"),
            "{e}"
        );
        let e = errs(&format!(
            "worker_memlock_mib = 64\nworker_memory_max_mib = 70\n{T}"
        ));
        assert!(e.contains("line 2") && e.contains("use at least 80"), "{e}");
        let e = errs(&format!("cgroup_root = \"/tmp/cg\"\n{T}"));
        assert!(
            e.contains("must be a directory below /sys/fs/cgroup"),
            "{e}"
        );
        let e = errs(&format!("cgroup_root = \"/sys/fs/cgroup\"\n{T}"));
        assert!(e.contains("not the root"), "{e}");
        let e = errs(&format!("cgroups = \"maybe\"\n{T}"));
        assert!(e.contains("line 1") && e.contains("maybe"), "{e}");
    }
}
