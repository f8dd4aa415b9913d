//! `policy.toml`: the broker's settings and its tenants, parsed and
//! validated with line-numbered errors.
//!
//! Parsing goes through "raw" structs whose fields keep their byte spans
//! (`toml::Spanned`), so that a semantic error (two tenants claiming one
//! uid, a relative image root...) points at the line that caused it, the
//! same way a syntax error does.

mod io_limits;
mod mirror;
mod read_cache;
pub use mirror::MirrorGrants;

use crate::path::{normalize_absolute, PathError};
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

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

/// One problem in a policy file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based; 0 when the problem has no place (e.g. a missing key).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

/// Every problem found in a policy file (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// One line per problem, each prefixed with `origin:LINE:COL:`, as
    /// compilers print them.
    pub fn render(&self, origin: &str) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            if d.line == 0 {
                out.push_str(&format!("{origin}: {}\n", d.message));
            } else {
                out.push_str(&format!(
                    "{origin}:{}:{}: {}\n",
                    d.line, d.column, d.message
                ));
            }
        }
        out
    }
}

/// Warnings as `origin:LINE:COL: warning: message` lines.
pub fn render_warnings(warnings: &[Diagnostic], origin: &str) -> String {
    let mut out = String::new();
    for d in warnings {
        out.push_str(&format!(
            "{origin}:{}:{}: warning: {}\n",
            d.line, d.column, d.message
        ));
    }
    out
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for d in &self.diagnostics {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    socket: Option<Spanned<String>>,
    audit_log: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    device_dir: Option<Spanned<String>>,
    worker_uids: Option<Spanned<Vec<i64>>>,
    tapdisk: Option<Spanned<String>>,
    frontend: Option<Spanned<FrontendChoice>>,
    nbd_kernel_connections: Option<Spanned<i64>>,
    worker_memlock_mib: Option<Spanned<i64>>,
    respawn: Option<bool>,
    max_restarts_per_minute: Option<Spanned<i64>>,
    worker_timeout_secs: Option<Spanned<i64>>,
    operation_timeout_secs: Option<Spanned<i64>>,
    client_frame_timeout_secs: Option<Spanned<i64>>,
    max_clients: Option<Spanned<i64>>,
    audit_window_secs: Option<Spanned<i64>>,
    subuid_file: Option<Spanned<String>>,
    subgid_file: Option<Spanned<String>>,
    passwd_file: Option<Spanned<String>>,
    group_file: Option<Spanned<String>>,
    cgroups: Option<Spanned<crate::cgroups::CgroupMode>>,
    cgroup_root: Option<Spanned<String>>,
    worker_memory_max_mib: Option<Spanned<i64>>,
    worker_pids_max: Option<Spanned<i64>>,
    #[serde(default)]
    tenant: Vec<Spanned<RawTenant>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: Spanned<String>,
    #[serde(default)]
    uids: Vec<Spanned<i64>>,
    #[serde(default)]
    gids: Vec<Spanned<i64>>,
    #[serde(default)]
    image_roots: Vec<Spanned<RawRoot>>,
    writable: Option<bool>,
    max_disks: Option<Spanned<i64>>,
    minors: Option<Spanned<Vec<i64>>>,
    admin: Option<bool>,
    max_clients: Option<Spanned<i64>>,
    cpu_weight: Option<Spanned<i64>>,
    io_weight: Option<Spanned<i64>>,
    disk_io: Option<io_limits::RawIo>,
    tenant_io: Option<io_limits::RawIo>,
    page_cache: Option<bool>,
    share_parent: Option<bool>,
    mirror: Option<mirror::RawMirror>,
    encryption: Option<bool>,
    online_snapshot: Option<bool>,
    cbt: Option<bool>,
    read_cache_root: Option<Spanned<String>>,
}

/// One entry of `image_roots`: a path, or a table with the path and the
/// root's own keys (`{ path = "/srv/gold", shared_readonly = true }`).
#[derive(Debug)]
struct RawRoot {
    path: String,
    shared_readonly: bool,
}

impl<'de> Deserialize<'de> for RawRoot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRoot;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path, or a table { path = \"...\", shared_readonly = true }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawRoot, E> {
                Ok(RawRoot {
                    path: v.to_string(),
                    shared_readonly: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<RawRoot, A::Error> {
                let mut path = None;
                let mut shared_readonly = None;
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "path" if path.is_none() => path = Some(m.next_value::<String>()?),
                        "shared_readonly" if shared_readonly.is_none() => {
                            shared_readonly = Some(m.next_value::<bool>()?)
                        }
                        "path" | "shared_readonly" => {
                            return Err(serde::de::Error::duplicate_field("image root key"))
                        }
                        other => {
                            return Err(serde::de::Error::unknown_field(
                                other,
                                &["path", "shared_readonly"],
                            ))
                        }
                    }
                }
                Ok(RawRoot {
                    path: path.ok_or_else(|| serde::de::Error::missing_field("path"))?,
                    shared_readonly: shared_readonly.unwrap_or(false),
                })
            }
        }
        d.deserialize_any(V)
    }
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

/// Accumulates diagnostics against the source text (for line numbers).
pub(crate) struct Checker<'a> {
    text: &'a str,
    diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.diags.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    fn nowhere(&mut self, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            line: 0,
            column: 0,
            message: message.into(),
        });
    }

    pub(crate) fn abs_path(
        &mut self,
        key: &str,
        v: Option<Spanned<String>>,
        default: &str,
    ) -> PathBuf {
        match v {
            None => PathBuf::from(default),
            Some(s) => {
                let span = s.span();
                match normalize_absolute(Path::new(s.get_ref())) {
                    Ok(p) => p,
                    Err(e) => {
                        self.at(span, format!("{key}: {}", path_problem(s.get_ref(), &e)));
                        PathBuf::from(default)
                    }
                }
            }
        }
    }

    pub(crate) fn int_in<T: TryFrom<i64> + Copy>(
        &mut self,
        key: &str,
        v: &Spanned<i64>,
        lo: i64,
        hi: i64,
        fallback: T,
    ) -> T {
        let n = *v.get_ref();
        if n < lo || n > hi {
            self.at(
                v.span(),
                format!("{key} = {n} is out of range ({lo}..={hi})"),
            );
            return fallback;
        }
        T::try_from(n).unwrap_or(fallback)
    }
}

fn path_problem(path: &str, e: &PathError) -> String {
    format!("{path:?}: {e}")
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = text
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count())
        + 1;
    (line, column)
}

fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
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

    if raw.tenant.is_empty() {
        c.nowhere("no [[tenant]] defined: every client would be refused");
    }
    let mut tenants = Vec::new();
    // (value, tenant index) of every uid, gid, name seen, for duplicates.
    let mut seen_uid: Vec<(u32, String)> = Vec::new();
    let mut seen_gid: Vec<(u32, String)> = Vec::new();
    let mut minor_ranges: Vec<((u16, u16), String)> = Vec::new();
    for t in raw.tenant {
        let tspan = t.span();
        let t = t.into_inner();
        let name = t.name.get_ref().clone();
        if !valid_tenant_name(&name) {
            c.at(
                t.name.span(),
                format!("tenant name {name:?} must be 1-64 of a-z, 0-9, '-', '_'"),
            );
        }
        if tenants.iter().any(|o: &Tenant| o.name == name) {
            c.at(t.name.span(), format!("tenant {name:?} is defined twice"));
        }
        if t.uids.is_empty() && t.gids.is_empty() {
            c.at(
                tspan.clone(),
                format!("tenant {name:?} has neither uids nor gids: nobody could act as it"),
            );
        }
        let mut uids = Vec::new();
        for u in &t.uids {
            let Some(v) = id(c, "uid", u) else { continue };
            if (worker_uids.0..=worker_uids.1).contains(&v) {
                c.at(u.span(), format!("uid {v} of tenant {name:?} is inside worker_uids: a tenant must never share a worker's uid"));
            }
            if let Some((_, other)) = seen_uid.iter().find(|(x, _)| *x == v) {
                c.at(
                    u.span(),
                    format!("uid {v} is claimed by tenants {other:?} and {name:?}"),
                );
            }
            seen_uid.push((v, name.clone()));
            uids.push(v);
        }
        let mut gids = Vec::new();
        for g in &t.gids {
            let Some(v) = id(c, "gid", g) else { continue };
            if (worker_uids.0..=worker_uids.1).contains(&v) {
                c.at(
                    g.span(),
                    format!(
                        "gid {v} of tenant {name:?} is inside worker_uids (workers use equal gids)"
                    ),
                );
            }
            if let Some((_, other)) = seen_gid.iter().find(|(x, _)| *x == v) {
                c.at(
                    g.span(),
                    format!("gid {v} is claimed by tenants {other:?} and {name:?}"),
                );
            }
            seen_gid.push((v, name.clone()));
            gids.push(v);
        }
        let mut image_roots = Vec::new();
        let mut shared_roots = Vec::new();
        for r in &t.image_roots {
            let raw_root = r.get_ref();
            match normalize_absolute(Path::new(&raw_root.path)) {
                Ok(p) if p == Path::new("/") => c.at(
                    r.span(),
                    format!("image root \"/\" would expose the whole host to tenant {name:?}"),
                ),
                Ok(p) if image_roots.contains(&p) => c.at(
                    r.span(),
                    format!(
                        "image root {} is listed twice for tenant {name:?}",
                        p.display()
                    ),
                ),
                Ok(p) => {
                    if raw_root.shared_readonly {
                        shared_roots.push(p.clone());
                    }
                    image_roots.push(p)
                }
                Err(e) => c.at(
                    r.span(),
                    format!("image root {}", path_problem(&raw_root.path, &e)),
                ),
            }
        }
        // A shared root nested in (or containing) an ordinary root of the
        // same tenant would make the rules for one file depend on which
        // root matched first.
        for s in &shared_roots {
            if let Some(o) = image_roots
                .iter()
                .find(|o| *o != s && (o.starts_with(s) || s.starts_with(o)))
            {
                c.at(
                    tspan.clone(),
                    format!(
                        "shared_readonly image root {} of tenant {name:?} overlaps its image \
                         root {}: keep gold masters in a directory of their own",
                        s.display(),
                        o.display()
                    ),
                );
            }
        }
        let max_disks = t.max_disks.map_or(defaults::MAX_DISKS, |m| {
            c.int_in(
                "max_disks",
                &m,
                0,
                i64::from(tapjail_common::Minor::COUNT),
                0,
            )
        });
        let tenant_clients = t.max_clients.map_or(defaults::TENANT_MAX_CLIENTS, |m| {
            c.int_in(
                "max_clients",
                &m,
                1,
                i64::from(MAX_CLIENTS_LIMIT),
                defaults::TENANT_MAX_CLIENTS,
            )
        });
        let minors = t.minors.and_then(|m| {
            let span = m.span();
            match m.get_ref().as_slice() {
                [lo, hi] if *lo >= 0 && lo <= hi && *hi <= i64::from(MAX_MINOR) => {
                    let r = (u16::try_from(*lo).unwrap_or(0), u16::try_from(*hi).unwrap_or(0));
                    if let Some((_, other)) = minor_ranges
                        .iter()
                        .find(|((a, b), _)| r.0 <= *b && *a <= r.1)
                    {
                        c.at(span, format!("minors {}..={} of tenant {name:?} overlap those of tenant {other:?}", r.0, r.1));
                    }
                    minor_ranges.push((r, name.clone()));
                    Some(r)
                }
                _ => {
                    c.at(span, format!("minors must be a range [FIRST, LAST] within 0..={MAX_MINOR}"));
                    None
                }
            }
        });
        let disk_io = io_limits::build(c, &name, "disk_io", t.disk_io);
        let tenant_io = io_limits::build(c, &name, "tenant_io", t.tenant_io);
        let mirror = mirror::build(c, &name, t.mirror);
        let read_cache_root =
            read_cache::build(c, &name, t.read_cache_root, &image_roots, &shared_roots);
        tenants.push(Tenant {
            name,
            uids,
            gids,
            image_roots,
            shared_roots,
            writable: t.writable.unwrap_or(false),
            max_disks,
            minors,
            admin: t.admin.unwrap_or(false),
            max_clients: tenant_clients,
            cgroup: crate::cgroups::tenant(c, t.cpu_weight, t.io_weight),
            disk_io,
            tenant_io,
            page_cache: t.page_cache.unwrap_or(true),
            share_parent: t.share_parent.unwrap_or(true),
            mirror,
            encryption: t.encryption.unwrap_or(true),
            online_snapshot: t.online_snapshot.unwrap_or(true),
            cbt: t.cbt.unwrap_or(true),
            read_cache_root,
        });
    }

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

fn id(c: &mut Checker<'_>, what: &str, v: &Spanned<i64>) -> Option<u32> {
    match u32::try_from(*v.get_ref()) {
        Ok(x) if x != u32::MAX => Some(x),
        _ => {
            c.at(
                v.span(),
                format!("{what} {} is not a valid id", v.get_ref()),
            );
            None
        }
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
