//! The cgroup v2 keys of `policy.toml`: where the broker's subtree is, what
//! each worker's cgroup is limited to, and whether a host without usable
//! cgroups may still serve.
//!
//! Each worker runs in `<cgroup_root>/<tenant>/<minor>`; these keys only
//! say what to write there (the broker does the writing).

use crate::config::Checker;
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
    /// memory is locked) plus room for what the kernel charges besides
    /// (page tables, io_uring rings, socket buffers, reclaimable page cache).
    ///
    /// Not + 64: with 128 MiB in all, 1 MiB direct writes at depth 8 on a
    /// ublk disk failed with EIO in nestvm (they pass with room to spare;
    /// what the kernel charges then is not isolated yet, dirty page cache of
    /// the engine's buffered path is the suspect). 512 MiB in all still
    /// bounds a worker, and what it may pin stays RLIMIT_MEMLOCK.
    pub const WORKER_MEMORY_MAX_MIB: u64 = crate::config::defaults::WORKER_MEMLOCK_MIB + 448;
    /// pids.max of a worker: its own threads (FUSE: up to 16 serving
    /// threads plus control and log threads; ublk and NBD fewer) and the
    /// kernel's io-wq workers, which io_uring starts for every request that
    /// must block (1 MiB direct writes at depth 8 start dozens) and which
    /// count here. A creation refused by pids.max cancels the request
    /// (ECANCELED, an EIO to the guest): 64 failed 1 MiB writes on ublk in
    /// nestvm. So the default is the worker's own RLIMIT_NPROC budget
    /// (`tapjail_worker` THREAD_BUDGET): the cgroup never refuses a thread
    /// the rlimit allows, and still bounds a thread bomb.
    pub const WORKER_PIDS_MAX: u32 = 512;
    /// cgroup v2's own default weight (cpu.weight and io.weight).
    pub const WEIGHT: u32 = 100;
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

pub(crate) fn build(c: &mut Checker<'_>, raw: RawCgroupKeys, memlock_mib: u64) -> CgroupPolicy {
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
    let pids_max = raw.worker_pids_max.map_or(defaults::WORKER_PIDS_MAX, |m| {
        c.int_in(
            "worker_pids_max",
            &m,
            PIDS_MAX_RANGE.0,
            PIDS_MAX_RANGE.1,
            defaults::WORKER_PIDS_MAX,
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
