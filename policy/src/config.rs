//! `policy.toml`: the broker's settings and its tenants, parsed and
//! validated with line-numbered errors.
//!
//! Parsing goes through "raw" structs whose fields keep their byte spans
//! (`toml::Spanned`), so that a semantic error (two tenants claiming one
//! uid, a relative image root...) points at the line that caused it, the
//! same way a syntax error does.

mod diagnostic;
mod io_limits;
mod mirror;
mod raw;
mod read_cache;
mod tenant;

pub(crate) use diagnostic::Checker;
use diagnostic::{line_col, path_problem};
pub use diagnostic::{render_warnings, Diagnostic, PolicyError};
pub use mirror::MirrorGrants;
use raw::RawPolicy;

use crate::path::normalize_absolute;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The policy the broker starts with when no `--config` is given: it serves
/// root only, with images under `/var/lib/tapjail`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Highest minor number (blktap's limit is 16384 minors).
pub const MAX_MINOR: u16 = tapjail_common::Minor::COUNT - 1;

/// Most RLIMIT_MEMLOCK the config may give a worker, in MiB (64 GiB).
pub const MAX_WORKER_MEMLOCK_MIB: u64 = 64 * 1024;
/// Most sockets per nbd-kernel device (the broker's and the worker's
/// bound, `device::nbd_kernel::MAX_CONNECTIONS`).
pub const MAX_NBD_KERNEL_CONNECTIONS: i64 = 16;

/// Most concurrent client connections the config may allow.
pub const MAX_CLIENTS_LIMIT: u32 = 4096;

/// Largest policy file read (a real one is a few KiB; this keeps a wrong
/// path such as a log or a device from being read into memory).
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// Which kernel frontend serves minors (`frontend = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendChoice {
    /// The best this host supports: ublk, then FUSE + loop, then the
    /// kernel nbd client, then NBD.
    Auto,
    Ublk,
    Fuse,
    Nbd,
    /// `nbd-kernel`: `/dev/nbdN` connected to the worker by the broker.
    #[serde(rename = "nbd-kernel")]
    NbdKernel,
}

/// One tenant: who may act as it, and what it may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// Peers whose `SO_PEERCRED` uid is one of these act as this tenant.
    pub uids: Vec<u32>,
    /// Peers whose `SO_PEERCRED` gid is one of these act as this tenant
    /// (when no tenant claims their uid).
    pub gids: Vec<u32>,
    /// Directories images may be opened under (normalized, absolute).
    pub image_roots: Vec<PathBuf>,
    /// Those of `image_roots` marked `shared_readonly` (gold masters):
    /// opened read-only only, and a file there need not be owned by the
    /// tenant nor have a single link (it must still be readable by her).
    pub shared_roots: Vec<PathBuf>,
    /// `false`: only read-only (`-R`) opens.
    pub writable: bool,
    /// Most minors this tenant may hold at once, and most workers.
    pub max_disks: u32,
    /// Minors this tenant may allocate (inclusive); `None`: any free minor.
    pub minors: Option<(u16, u16)>,
    /// May list and manage (stats, pause, close, detach, destroy, free)
    /// every tenant's disks. Never needed to open images.
    pub admin: bool,
    /// Most connections all of this tenant's peers may hold at once (a
    /// tenant matched by gid has many uids, each with its own per-uid cap).
    pub max_clients: u32,
    /// cpu.weight and io.weight of the tenant's cgroup.
    pub cgroup: crate::cgroups::TenantCgroup,
    /// I/O limits of each of this tenant's disks (`disk_io`), unless an
    /// admin changes a disk's at runtime.
    pub disk_io: tapjail_common::qos::IoLimits,
    /// I/O limits of all of this tenant's disks together (`tenant_io`).
    pub tenant_io: tapjail_common::qos::IoLimits,
    /// May open with `-D` (no `O_DIRECT`: the host's page cache holds her
    /// data). Default true, as blktap.
    pub page_cache: bool,
    /// May open with `-e MINOR` (a clone reads its parent chain through
    /// the page cache, shared with her other clones). Default true.
    pub share_parent: bool,
    /// The secondaries `-2 URI` may mirror to (`mirror`); none by default.
    pub mirror: MirrorGrants,
    /// May open blktap's encrypted VHDs with `-E` (key on stdin). Default
    /// true, as blktap.
    pub encryption: bool,
    /// May take online snapshots (`tap-ctl snapshot`). Default true.
    pub online_snapshot: bool,
    /// May track changed blocks (`tap-ctl cbt`, `open -C`). Default true,
    /// as blktap: the bitmaps are files in her own roots.
    pub cbt: bool,
    /// Where `open -r` read caches may live (beneath one of her own image
    /// roots); `None`: `-r` is refused.
    pub read_cache_root: Option<PathBuf>,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    pub state_dir: PathBuf,
    /// Where `tapdevN` symlinks are published.
    pub device_dir: PathBuf,
    /// Inclusive range of uids (and equal gids) given to workers, one per
    /// live worker.
    pub worker_uids: (u32, u32),
    /// The worker binary; `None`: `tapdisk` next to the broker's executable,
    /// else `/usr/libexec/tapjail/tapdisk`.
    pub tapdisk: Option<PathBuf>,
    pub frontend: FrontendChoice,
    /// Sockets per nbd-kernel device (the kernel gives each its own
    /// hardware queue, as `nbd-client -connections` does).
    pub nbd_kernel_connections: u32,
    /// RLIMIT_MEMLOCK given to each worker, in bytes.
    pub worker_memlock: u64,
    /// Replace a dead worker serving an open image with a fresh one.
    pub respawn: bool,
    /// Most deaths per minor within a minute before it is left DEAD.
    pub max_restarts_per_minute: u32,
    /// Seconds a worker has to answer one control message.
    pub worker_timeout_secs: u32,
    /// Seconds one whole operation with a worker may take, every message
    /// of it (an open with all its parent requests) included.
    pub operation_timeout_secs: u32,
    /// Seconds a client has to send a whole frame once its first byte came.
    pub client_frame_timeout_secs: u32,
    /// Most concurrent client connections.
    pub max_clients: u32,
    /// Length of the audit log's denial budget window (seconds; 10
    /// unless a test needs a window that outlasts its flood).
    pub audit_window_secs: u32,
    /// Where to look for ids others own (`subuid_file`, ... keys; the
    /// real `/etc` files unless a test points elsewhere).
    pub id_files: crate::idmap::IdFiles,
    /// Each worker's cgroup v2 (`crate::cgroups`).
    pub cgroup: crate::cgroups::CgroupPolicy,
    pub tenants: Vec<Tenant>,
}

/// Defaults for keys a file leaves out.
pub mod defaults {
    pub const SOCKET: &str = tapjail_common::proto::DEFAULT_SOCKET;
    pub const AUDIT_LOG: &str = "/var/log/tapjail/audit.jsonl";
    pub const STATE_DIR: &str = "/run/tapjail";
    pub const DEVICE_DIR: &str = tapjail_common::Minor::DEVICE_DIR;
    /// Above everything that hands out ids: useradd's subordinate ranges
    /// (SUB_UID_MIN 100000 .. SUB_UID_MAX 600100000), systemd's dynamic
    /// users (61184-65519) and nspawn container ranges (524288 ..
    /// 1879048191), LXD/Incus's default map (1000000 .. 1001000000); below
    /// 2^31 (tools that keep uids in a signed int) and systemd's "foreign"
    /// range (2147352576..). `tap-broker` still checks the host's files
    /// (crate::idmap).
    pub const WORKER_UIDS: (u32, u32) = (2_000_000_000, 2_000_000_999);
    pub const AUDIT_WINDOW_SECS: u32 = 10;
    // What a worker locks serving (threads, buffers, rings, engine heap:
    // measured by `e2e cgroup::`, see bench/README.md) with room for deep
    // chains of large images.
    pub const WORKER_MEMLOCK_MIB: u64 = 64;
    pub const MAX_RESTARTS_PER_MINUTE: u32 = 5;
    pub const NBD_KERNEL_CONNECTIONS: u32 = 1;
    pub const WORKER_TIMEOUT_SECS: u32 = 30;
    pub const OPERATION_TIMEOUT_SECS: u32 = 120;
    pub const CLIENT_FRAME_TIMEOUT_SECS: u32 = 10;
    pub const TENANT_MAX_CLIENTS: u32 = 16;
    pub const MAX_CLIENTS: u32 = 64;
    pub const MAX_DISKS: u32 = 8;
}

/// What the caller found at an image root's path (see [`Policy::warnings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootProbe {
    /// A directory, reached without a symlink.
    Dir,
    /// Nothing there, or not a directory.
    Missing,
    /// A directory, but some component of the path is a symlink; this is
    /// the real path.
    ThroughSymlink(PathBuf),
}

impl RootProbe {
    /// Look at `root` on this host. The one place this crate touches the
    /// filesystem, for its callers (`tap-broker` at start, `tap-ctl policy
    /// check`); no decision calls it.
    pub fn look(root: &Path) -> RootProbe {
        match std::fs::canonicalize(root) {
            Ok(real) if real.is_dir() && real == root => RootProbe::Dir,
            Ok(real) if real.is_dir() => RootProbe::ThroughSymlink(real),
            _ => RootProbe::Missing,
        }
    }
}

impl Policy {
    /// The embedded default policy (root only).
    pub fn embedded_default() -> Policy {
        // The embedded text is validated by a unit test; a failure here is a
        // build defect, not bad input.
        match Policy::parse(EMBEDDED_DEFAULT) {
            Ok(p) => p,
            Err(e) => panic!("embedded default policy is invalid: {e}"),
        }
    }

    /// Parse and validate a policy file's text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
                return Err(PolicyError {
                    diagnostics: vec![Diagnostic {
                        line,
                        column,
                        message: e.message().trim().to_string(),
                    }],
                });
            }
        };
        let mut c = Checker {
            text,
            diags: Vec::new(),
        };
        let policy = build(&mut c, raw);
        if c.diags.is_empty() {
            Ok(policy)
        } else {
            c.diags.sort_by_key(|d| (d.line, d.column));
            Err(PolicyError {
                diagnostics: c.diags,
            })
        }
    }

    /// Things in a valid policy that are probably mistakes, with their
    /// lines: an image root that is not an existing directory or that is
    /// reached through a symlink (`probe` answers; the caller looks, this
    /// crate makes no syscalls), and image roots of two tenants that
    /// overlap (each can then open the other's images). Empty for text
    /// that does not parse.
    pub fn warnings(text: &str, probe: &dyn Fn(&Path) -> RootProbe) -> Vec<Diagnostic> {
        let Ok(raw) = toml::from_str::<RawPolicy>(text) else {
            return Vec::new();
        };
        let mut c = Checker {
            text,
            diags: Vec::new(),
        };
        // (tenant, normalized root, shared_readonly) of every root so far.
        let mut seen: Vec<(String, PathBuf, bool)> = Vec::new();
        for t in &raw.tenant {
            let t = t.get_ref();
            let name = t.name.get_ref();
            for r in &t.image_roots {
                let Ok(root) = normalize_absolute(Path::new(&r.get_ref().path)) else {
                    continue;
                };
                let shared = r.get_ref().shared_readonly;
                match probe(&root) {
                    RootProbe::Dir => {}
                    RootProbe::Missing => c.at(
                        r.span(),
                        format!(
                            "image root {} of tenant {name:?} is not an existing directory: \
                             its opens fail until it is created",
                            root.display()
                        ),
                    ),
                    RootProbe::ThroughSymlink(real) => c.at(
                        r.span(),
                        format!(
                            "image root {} of tenant {name:?} is reached through a symlink \
                             (it is {}): tap-broker follows no symlink to a root, so every \
                             open under it is refused; name the real path",
                            root.display(),
                            real.display()
                        ),
                    ),
                }
                for (other, o, o_shared) in seen.iter().filter(|(other, _, _)| other != name) {
                    let how = if root == *o && shared && *o_shared {
                        // A gold-master directory shared on purpose: no
                        // tenant may open anything there writable.
                        continue;
                    } else if root == *o {
                        "is also an image root"
                    } else if root.starts_with(o) {
                        "lies inside the image root"
                    } else if o.starts_with(&root) {
                        "contains the image root"
                    } else {
                        continue;
                    };
                    c.at(
                        r.span(),
                        format!(
                            "image root {} of tenant {name:?} {how} {} of tenant {other:?}: \
                             each can open images the other puts there",
                            root.display(),
                            o.display()
                        ),
                    );
                }
                seen.push((name.clone(), root, shared));
            }
        }
        c.diags.sort_by_key(|d| (d.line, d.column));
        c.diags
    }

    /// The tenant a peer acts as: the one listing its uid, else the one
    /// listing its gid, else none (and then it is refused everything).
    pub fn tenant_for(&self, uid: u32, gid: u32) -> Option<&Tenant> {
        self.tenants
            .iter()
            .find(|t| t.uids.contains(&uid))
            .or_else(|| self.tenants.iter().find(|t| t.gids.contains(&gid)))
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// How many worker uids the range holds (the most live workers).
    pub fn worker_uid_count(&self) -> u64 {
        u64::from(self.worker_uids.1) - u64::from(self.worker_uids.0) + 1
    }
}

fn build(c: &mut Checker<'_>, raw: RawPolicy) -> Policy {
    let socket = c.abs_path("socket", raw.socket, defaults::SOCKET);
    let audit_log = c.abs_path("audit_log", raw.audit_log, defaults::AUDIT_LOG);
    let state_dir = c.abs_path("state_dir", raw.state_dir, defaults::STATE_DIR);
    let device_dir = c.abs_path("device_dir", raw.device_dir, defaults::DEVICE_DIR);
    let tapdisk = raw
        .tapdisk
        .map(|t| c.abs_path("tapdisk", Some(t), "/usr/libexec/tapjail/tapdisk"));

    let worker_uids = match raw.worker_uids {
        None => defaults::WORKER_UIDS,
        Some(w) => {
            let span = w.span();
            match w.get_ref().as_slice() {
                [lo, hi] if *lo >= 1 && lo <= hi && *hi <= i64::from(u32::MAX - 1) => (
                    u32::try_from(*lo).unwrap_or(1),
                    u32::try_from(*hi).unwrap_or(1),
                ),
                [lo, _] if *lo < 1 => {
                    c.at(
                        span,
                        "worker_uids must not include uid 0 (workers never run as root)",
                    );
                    defaults::WORKER_UIDS
                }
                [_, _] => {
                    c.at(
                        span,
                        "worker_uids = [FIRST, LAST] needs FIRST <= LAST, both below 4294967295",
                    );
                    defaults::WORKER_UIDS
                }
                _ => {
                    c.at(
                        span,
                        "worker_uids must be a range [FIRST, LAST] of two uids",
                    );
                    defaults::WORKER_UIDS
                }
            }
        }
    };

    let frontend = raw.frontend.map_or(FrontendChoice::Auto, |f| *f.get_ref());
    let memlock_mib = raw
        .worker_memlock_mib
        .as_ref()
        .map_or(defaults::WORKER_MEMLOCK_MIB, |m| {
            u64::try_from(*m.get_ref()).unwrap_or(defaults::WORKER_MEMLOCK_MIB)
        });
    let cgroup = crate::cgroups::build(
        c,
        crate::cgroups::RawCgroupKeys {
            cgroups: raw.cgroups,
            cgroup_root: raw.cgroup_root,
            worker_memory_max_mib: raw.worker_memory_max_mib,
            worker_pids_max: raw.worker_pids_max,
        },
        memlock_mib,
        frontend,
    );
    let worker_memlock = raw
        .worker_memlock_mib
        .map_or(defaults::WORKER_MEMLOCK_MIB, |m| {
            c.int_in(
                "worker_memlock_mib",
                &m,
                1,
                MAX_WORKER_MEMLOCK_MIB as i64,
                defaults::WORKER_MEMLOCK_MIB,
            )
        })
        * 1024
        * 1024;
    let nbd_kernel_connections =
        raw.nbd_kernel_connections
            .map_or(defaults::NBD_KERNEL_CONNECTIONS, |n| {
                c.int_in(
                    "nbd_kernel_connections",
                    &n,
                    1,
                    MAX_NBD_KERNEL_CONNECTIONS,
                    defaults::NBD_KERNEL_CONNECTIONS,
                )
            });
    let max_restarts_per_minute = raw
        .max_restarts_per_minute
        .map_or(defaults::MAX_RESTARTS_PER_MINUTE, |m| {
            c.int_in("max_restarts_per_minute", &m, 0, 1000, 0)
        });
    let worker_timeout_secs = raw
        .worker_timeout_secs
        .map_or(defaults::WORKER_TIMEOUT_SECS, |m| {
            c.int_in(
                "worker_timeout_secs",
                &m,
                1,
                3600,
                defaults::WORKER_TIMEOUT_SECS,
            )
        });
    let operation_timeout_secs =
        raw.operation_timeout_secs
            .map_or(defaults::OPERATION_TIMEOUT_SECS, |m| {
                c.int_in(
                    "operation_timeout_secs",
                    &m,
                    1,
                    3600,
                    defaults::OPERATION_TIMEOUT_SECS,
                )
            });
    let client_frame_timeout_secs =
        raw.client_frame_timeout_secs
            .map_or(defaults::CLIENT_FRAME_TIMEOUT_SECS, |m| {
                c.int_in(
                    "client_frame_timeout_secs",
                    &m,
                    1,
                    600,
                    defaults::CLIENT_FRAME_TIMEOUT_SECS,
                )
            });
    let max_clients = raw.max_clients.map_or(defaults::MAX_CLIENTS, |m| {
        c.int_in(
            "max_clients",
            &m,
            1,
            i64::from(MAX_CLIENTS_LIMIT),
            defaults::MAX_CLIENTS,
        )
    });

    let audit_window_secs = raw
        .audit_window_secs
        .map_or(defaults::AUDIT_WINDOW_SECS, |m| {
            c.int_in(
                "audit_window_secs",
                &m,
                1,
                86_400,
                defaults::AUDIT_WINDOW_SECS,
            )
        });
    let std_ids = crate::idmap::IdFiles::default();
    let id_files = crate::idmap::IdFiles {
        subuid: c.abs_path(
            "subuid_file",
            raw.subuid_file,
            &std_ids.subuid.to_string_lossy(),
        ),
        subgid: c.abs_path(
            "subgid_file",
            raw.subgid_file,
            &std_ids.subgid.to_string_lossy(),
        ),
        passwd: c.abs_path(
            "passwd_file",
            raw.passwd_file,
            &std_ids.passwd.to_string_lossy(),
        ),
        group: c.abs_path(
            "group_file",
            raw.group_file,
            &std_ids.group.to_string_lossy(),
        ),
    };

    let tenants = tenant::build_all(c, raw.tenant, worker_uids);

    Policy {
        socket,
        audit_log,
        state_dir,
        device_dir,
        worker_uids,
        tapdisk,
        frontend,
        worker_memlock,
        respawn: raw.respawn.unwrap_or(true),
        max_restarts_per_minute,
        nbd_kernel_connections,
        worker_timeout_secs,
        operation_timeout_secs,
        client_frame_timeout_secs,
        max_clients,
        audit_window_secs,
        id_files,
        cgroup,
        tenants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
socket = "/tmp/t/broker.sock"
audit_log = "/tmp/t/audit.jsonl"
state_dir = "/tmp/t/state"
worker_uids = [300000, 300999]
frontend = "nbd"

[[tenant]]
name = "alice"
uids = [4242]
image_roots = ["/srv/alice/"]
writable = true
max_disks = 2
minors = [0, 99]

[[tenant]]
name = "bob"
gids = [5000]
image_roots = ["/srv/bob"]
"#;

    fn errs(text: &str) -> Vec<Diagnostic> {
        Policy::parse(text).unwrap_err().diagnostics
    }

    #[test]
    fn parse_good_policy_has_every_field() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.socket, Path::new("/tmp/t/broker.sock"));
        assert_eq!(p.worker_uids, (300000, 300999));
        assert_eq!(p.worker_uid_count(), 1000);
        assert_eq!(p.frontend, FrontendChoice::Nbd);
        assert_eq!(p.device_dir, Path::new("/dev/tapjail"));
        assert_eq!(p.worker_memlock, defaults::WORKER_MEMLOCK_MIB * 1024 * 1024);
        assert!(p.respawn);
        let a = p.tenant("alice").unwrap();
        assert_eq!(a.image_roots, vec![PathBuf::from("/srv/alice")]);
        assert!(a.writable);
        assert_eq!(a.max_disks, 2);
        assert_eq!(a.minors, Some((0, 99)));
        let b = p.tenant("bob").unwrap();
        assert!(!b.writable, "writable defaults to false");
        assert_eq!(b.max_disks, defaults::MAX_DISKS);
        assert!(!b.admin);
    }

    #[test]
    fn nbd_kernel_connections_defaults_to_one_and_is_bounded() {
        assert_eq!(Policy::parse(GOOD).unwrap().nbd_kernel_connections, 1);
        let with = |n: &str| {
            GOOD.replace(
                "frontend = \"nbd\"",
                &format!("frontend = \"nbd-kernel\"\nnbd_kernel_connections = {n}"),
            )
        };
        assert_eq!(Policy::parse(&with("4")).unwrap().nbd_kernel_connections, 4);
        for bad in ["0", "17", "-1"] {
            let e = errs(&with(bad));
            assert!(
                e.iter()
                    .any(|d| d.to_string().contains("nbd_kernel_connections")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn tenant_for_prefers_uid_then_gid_then_none() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.tenant_for(4242, 5000).unwrap().name, "alice");
        assert_eq!(p.tenant_for(1, 5000).unwrap().name, "bob");
        assert!(p.tenant_for(0, 0).is_none(), "root is nobody special");
    }

    #[test]
    fn embedded_default_is_valid_and_root_only() {
        let p = Policy::embedded_default();
        assert_eq!(p.socket, Path::new("/run/tapjail/broker.sock"));
        assert_eq!(p.audit_log, Path::new("/var/log/tapjail/audit.jsonl"));
        assert_eq!(p.tenants.len(), 1);
        assert_eq!(
            p.tenant_for(0, 0).unwrap().image_roots,
            vec![PathBuf::from("/var/lib/tapjail")]
        );
        assert!(p.tenant_for(1000, 1000).is_none());
    }

    #[test]
    fn syntax_error_has_line_number() {
        let d = errs("socket = \"/x\"\n\n[[tenant]\nname = 1\n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 3, "{d:?}");
    }

    #[test]
    fn unknown_key_is_rejected_with_line() {
        let d = errs("socket = \"/x\"\nsokcet = \"/y\"\n[[tenant]]\nname=\"a\"\nuids=[1]\n");
        assert_eq!(d[0].line, 2, "{d:?}");
        assert!(d[0].message.contains("sokcet"), "{d:?}");
    }

    #[test]
    fn duplicate_uid_across_tenants_names_both_and_the_line() {
        let text = "[[tenant]]\nname = \"a\"\nuids = [7]\n[[tenant]]\nname = \"b\"\nuids = [7]\n";
        let d = errs(text);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 6);
        assert!(d[0].message.contains("\"a\"") && d[0].message.contains("\"b\""));
    }

    #[test]
    fn relative_root_and_dotdot_root_are_rejected() {
        let text =
            "[[tenant]]\nname = \"a\"\nuids = [7]\nimage_roots = [\"srv/a\",\n \"/srv/../etc\"]\n";
        let d = errs(text);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!((d[0].line, d[1].line), (4, 5));
    }

    #[test]
    fn root_slash_as_image_root_is_rejected() {
        let d = errs("[[tenant]]\nname = \"a\"\nuids = [7]\nimage_roots = [\"/\"]\n");
        assert!(d[0].message.contains("whole host"));
    }

    #[test]
    fn tenant_uid_inside_worker_range_is_rejected() {
        let d = errs("worker_uids = [100, 200]\n[[tenant]]\nname = \"a\"\nuids = [150]\n");
        assert_eq!(d[0].line, 4);
        assert!(d[0].message.contains("worker_uids"));
    }

    #[test]
    fn audit_window_and_id_files_have_defaults_and_are_checked() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.audit_window_secs, 10);
        assert_eq!(p.id_files, crate::idmap::IdFiles::default());
        let p = Policy::parse(&format!(
            "audit_window_secs = 3600\nsubuid_file = \"/t/subuid\"\n{GOOD}"
        ))
        .unwrap();
        assert_eq!(p.audit_window_secs, 3600);
        assert_eq!(p.id_files.subuid, Path::new("/t/subuid"));
        let d = errs(&format!(
            "audit_window_secs = 0\npasswd_file = \"etc/passwd\"\n{GOOD}"
        ));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].message
                .contains("audit_window_secs = 0 is out of range"),
            "{d:?}"
        );
        assert!(d[1].message.starts_with("passwd_file:"), "{d:?}");
        assert_eq!((d[0].line, d[1].line), (1, 2));
    }

    #[test]
    fn worker_uids_must_be_a_nonroot_range() {
        for bad in ["[0, 10]", "[10, 5]", "[1]", "[1, 2, 3]", "[-5, 3]"] {
            let d = errs(&format!(
                "worker_uids = {bad}\n[[tenant]]\nname = \"a\"\nuids = [7]\n"
            ));
            assert_eq!(d[0].line, 1, "{bad}: {d:?}");
        }
    }

    #[test]
    fn overlapping_minor_ranges_are_rejected() {
        let text = "[[tenant]]\nname = \"a\"\nuids = [1]\nminors = [0, 10]\n[[tenant]]\nname = \"b\"\nuids = [2]\nminors = [10, 20]\n";
        let d = errs(text);
        assert_eq!(d[0].line, 8);
        let d = errs("[[tenant]]\nname = \"a\"\nuids = [1]\nminors = [0, 16384]\n");
        assert_eq!(d[0].line, 4);
    }

    #[test]
    fn frontend_nbd_kernel_is_spelled_with_a_dash() {
        let p = Policy::parse(&GOOD.replace("\"nbd\"", "\"nbd-kernel\"")).unwrap();
        assert_eq!(p.frontend, FrontendChoice::NbdKernel);
        let d = errs(&GOOD.replace("\"nbd\"", "\"nbd_kernel\""));
        assert_eq!(d[0].line, 6, "{d:?}");
        assert!(d[0].message.contains("nbd-kernel"), "{d:?}");
    }

    #[test]
    fn bad_frontend_value_is_rejected_with_line() {
        let d = errs("\nfrontend = \"blktap2\"\n[[tenant]]\nname = \"a\"\nuids = [1]\n");
        assert_eq!(d[0].line, 2);
    }

    #[test]
    fn tenant_without_ids_and_bad_name_and_no_tenants_are_rejected() {
        let d = errs("[[tenant]]\nname = \"Alice!\"\n");
        assert_eq!(d.len(), 2, "{d:?}");
        let d = errs("socket = \"/x\"\n");
        assert_eq!(d[0].line, 0);
        assert!(d[0].message.contains("no [[tenant]]"));
    }

    #[test]
    fn out_of_range_numbers_are_rejected() {
        let d = errs("worker_memlock_mib = 0\nmax_clients = 100000\n[[tenant]]\nname = \"a\"\nuids = [1]\nmax_disks = -1\n");
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![1, 2, 6]);
    }

    #[test]
    fn deadlines_and_tenant_connection_caps_parse_default_and_are_bounded() {
        let p = Policy::parse("[[tenant]]\nname = \"a\"\ngids = [1]\n").unwrap();
        assert_eq!(p.operation_timeout_secs, defaults::OPERATION_TIMEOUT_SECS);
        assert_eq!(
            p.client_frame_timeout_secs,
            defaults::CLIENT_FRAME_TIMEOUT_SECS
        );
        assert_eq!(p.tenants[0].max_clients, defaults::TENANT_MAX_CLIENTS);
        let p = Policy::parse(
            "operation_timeout_secs = 7\nclient_frame_timeout_secs = 2\n[[tenant]]\nname = \"a\"\ngids = [1]\nmax_clients = 3\n",
        )
        .unwrap();
        assert_eq!(
            (
                p.operation_timeout_secs,
                p.client_frame_timeout_secs,
                p.tenants[0].max_clients
            ),
            (7, 2, 3)
        );
        let d = errs("operation_timeout_secs = 0\nclient_frame_timeout_secs = 601\n[[tenant]]\nname = \"a\"\nuids = [1]\nmax_clients = 0\n");
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![1, 2, 6], "{d:?}");
    }

    #[test]
    fn render_prefixes_origin_line_and_column() {
        let e = Policy::parse("[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"rel\"]\n")
            .unwrap_err();
        let s = e.render("p.toml");
        assert!(s.starts_with("p.toml:4:16: image root"), "{s}");
    }

    #[test]
    fn warnings_missing_root_and_overlapping_roots_have_lines() {
        let text = "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"/srv\"]\n\
                    [[tenant]]\nname = \"b\"\nuids = [2]\nimage_roots = [\"/srv/b\", \"/gone\"]\n\
                    [[tenant]]\nname = \"c\"\nuids = [3]\nimage_roots = [\"/srv/\", \"/c\"]\n";
        assert!(Policy::parse(text).is_ok());
        let w = Policy::warnings(text, &|p| {
            if p == Path::new("/gone") {
                RootProbe::Missing
            } else if p == Path::new("/c") {
                RootProbe::ThroughSymlink(PathBuf::from("/real/c"))
            } else {
                RootProbe::Dir
            }
        });
        let at = |line: usize, needle: &str| {
            w.iter()
                .any(|d| d.line == line && d.message.contains(needle))
        };
        assert!(
            at(
                8,
                "/srv/b of tenant \"b\" lies inside the image root /srv of tenant \"a\""
            ),
            "{w:?}"
        );
        assert!(
            at(8, "/gone of tenant \"b\" is not an existing directory"),
            "{w:?}"
        );
        assert!(
            at(
                12,
                "/srv of tenant \"c\" is also an image root /srv of tenant \"a\""
            ),
            "{w:?}"
        );
        assert!(
            at(
                12,
                "/srv of tenant \"c\" contains the image root /srv/b of tenant \"b\""
            ),
            "{w:?}"
        );
        assert!(
            at(
                12,
                "/c of tenant \"c\" is reached through a symlink (it is /real/c)"
            ),
            "{w:?}"
        );
        assert_eq!(w.len(), 5, "{w:?}");
        assert!(render_warnings(&w, "p.toml").starts_with("p.toml:8:"));
        // The embedded default has nothing to warn about but its root.
        assert!(Policy::warnings(EMBEDDED_DEFAULT, &|_| RootProbe::Dir).is_empty());
    }

    #[test]
    fn shared_readonly_roots_parse_and_bad_ones_are_rejected_with_lines() {
        let p = Policy::parse(
            "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"/srv/a\",\n  { path = \"/srv/gold/\", shared_readonly = true },\n  { path = \"/srv/b\" }]\n",
        )
        .unwrap();
        let t = p.tenant("a").unwrap();
        assert_eq!(
            t.image_roots,
            vec![
                PathBuf::from("/srv/a"),
                PathBuf::from("/srv/gold"),
                PathBuf::from("/srv/b")
            ]
        );
        assert_eq!(t.shared_roots, vec![PathBuf::from("/srv/gold")]);
        for (bad, line, needle) in [
            ("{ path = \"/g\", shared_readonly = \"yes\" }", 4, "bool"),
            (
                "{ path = \"/g\", shared = true }",
                4,
                "unknown field `shared`",
            ),
            ("{ shared_readonly = true }", 4, "missing field `path`"),
            ("{ path = \"g\", shared_readonly = true }", 4, "\"g\""),
            (
                "\"/srv/x\", { path = \"/srv/x/gold\", shared_readonly = true }",
                1,
                "overlaps",
            ),
            ("\"/srv/x\", \"/srv/x/\"", 4, "listed twice"),
        ] {
            let d = errs(&format!(
                "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [{bad}]\n"
            ));
            assert_eq!(d[0].line, line, "{bad}: {d:?}");
            assert!(d[0].message.contains(needle), "{bad}: {d:?}");
        }
        // Two tenants sharing one gold-master root on purpose: no warning;
        // an ordinary root shared is still one.
        let text = "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [{ path = \"/g\", shared_readonly = true }]\n\
                    [[tenant]]\nname = \"b\"\nuids = [2]\nimage_roots = [{ path = \"/g\", shared_readonly = true }, \"/h\"]\n\
                    [[tenant]]\nname = \"c\"\nuids = [3]\nimage_roots = [\"/h\"]\n";
        let w = Policy::warnings(text, &|_| RootProbe::Dir);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("/h of tenant \"c\" is also"), "{w:?}");
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\ncd", 99), (2, 3));
    }
}
