//! The decision function: may this peer make this request, given who owns
//! what right now?
//!
//! Pure: the broker supplies the peer's `SO_PEERCRED` identity and a
//! read-only view of its tables; nothing here touches the system. State
//! errors (unknown minor, open twice...) are the broker's to report; the
//! policy only answers "is this yours, and within your limits".

use crate::config::{Policy, Tenant};
use crate::path::{normalize_absolute, normalize_lexically, under_root, PathError};
use std::path::{Path, PathBuf};
use tapjail_common::proto::{ImageSpec, Request};
use tapjail_common::Minor;

/// Who is asking, from `SO_PEERCRED` (never from the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the policy may know about the broker's tables: ownership and
/// counts, by tenant name.
pub trait BrokerView {
    /// The tenant holding `minor`, or `None` if it is not allocated.
    fn minor_owner(&self, minor: Minor) -> Option<&str>;
    /// The tenant owning worker `pid`, or `None` if no such worker.
    fn worker_owner(&self, pid: u32) -> Option<&str>;
    /// Minors `tenant` holds.
    fn minors_of(&self, tenant: &str) -> usize;
    /// Live or dead-but-unreleased workers `tenant` owns.
    fn workers_of(&self, tenant: &str) -> usize;
}

/// Which rows `list` may show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the requesting tenant's minors and workers.
    Own,
    /// Everything (an `admin` tenant).
    All,
}

/// Whose credentials the broker opens an image with, and whose files it
/// may hand over: the requesting peer's, so that a tenant never gets a
/// file she could not open herself (a hard link to a root-only file in
/// her root, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAs {
    /// fsuid/fsgid of the open (no supplementary groups).
    pub uid: u32,
    pub gid: u32,
    /// A file outside a shared root must be owned by one of these (the
    /// peer's uid and the tenant's configured uids).
    pub owners: Vec<u32>,
}

impl OpenAs {
    /// The identity of `peer` acting as tenant `t`.
    pub fn peer(peer: &PeerCred, t: &Tenant) -> OpenAs {
        let mut owners = vec![peer.uid];
        owners.extend(t.uids.iter().copied().filter(|u| *u != peer.uid));
        OpenAs {
            uid: peer.uid,
            gid: peer.gid,
            owners,
        }
    }
}

/// An image the broker may open: `relative` beneath `root`, opened with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
/// RESOLVE_NO_XDEV)` with the credentials in `open_as`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageGrant {
    /// The normalized full path (`root/relative`), as shown in `list`.
    pub path: PathBuf,
    pub root: PathBuf,
    pub relative: PathBuf,
    pub read_only: bool,
    /// Who opens it (and must own it, unless `shared`).
    pub open_as: OpenAs,
    /// `root` is a `shared_readonly` root: read-only opens only; the file
    /// need not be the tenant's own nor have a single link.
    pub shared: bool,
}

/// The answer, with the rule that produced it for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Stable identifier of the rule that decided (for audit and tests).
    pub rule: &'static str,
    /// Human explanation, sent to the client on denial.
    pub reason: String,
    /// The tenant the peer acts as, if any.
    pub tenant: Option<String>,
    pub scope: Scope,
    /// For open/create/unpause -a and parent opens: what may be opened.
    pub image: Option<ImageGrant>,
    /// For allocate/create: the minors the broker may pick from.
    pub minors: Option<(u16, u16)>,
}

impl Decision {
    pub(crate) fn deny(tenant: Option<&Tenant>, rule: &'static str, reason: String) -> Self {
        Decision {
            allow: false,
            rule,
            reason,
            tenant: tenant.map(|t| t.name.clone()),
            scope: Scope::Own,
            image: None,
            minors: None,
        }
    }

    pub(crate) fn allow(t: &Tenant, rule: &'static str, reason: String) -> Self {
        Decision {
            allow: true,
            rule,
            reason,
            tenant: Some(t.name.clone()),
            scope: Scope::Own,
            image: None,
            minors: None,
        }
    }
}

/// Decide a client request.
pub fn decide(req: &Request, peer: &PeerCred, policy: &Policy, view: &dyn BrokerView) -> Decision {
    let Some(t) = policy.tenant_for(peer.uid, peer.gid) else {
        return Decision::deny(
            None,
            "no-tenant",
            format!(
                "uid {} gid {} matches no tenant in the broker's policy",
                peer.uid, peer.gid
            ),
        );
    };
    match req {
        Request::Hello { .. } | Request::Major => {
            Decision::allow(t, "tenant", format!("peer acts as tenant {}", t.name))
        }
        Request::WithOptions { req, opts } => {
            crate::xapi::decide_options(req, opts, peer, policy, view, t)
        }
        Request::List { .. } => {
            let mut d = Decision::allow(t, "list", format!("tenant {} lists", t.name));
            if t.admin {
                d.scope = Scope::All;
                d.rule = "admin";
            }
            d
        }
        Request::Allocate { minor } => allocate(t, *minor, view),
        Request::Spawn => spawn(t, view),
        Request::Create {
            image,
            read_only,
            minor,
        } => {
            let d = allocate(t, *minor, view);
            if !d.allow {
                return d;
            }
            let s = spawn(t, view);
            if !s.allow {
                return s;
            }
            with_image(t, peer, image, *read_only, d)
        }
        Request::Attach { pid, minor } => {
            // Attaching joins a worker and a minor; both must be the
            // tenant's own, admin or not, so that a disk never mixes owners.
            if let Some(d) = foreign_minor(t, *minor, view, false) {
                return d;
            }
            if let Some(d) = foreign_worker(t, Some(*pid), view, false) {
                return d;
            }
            Decision::allow(
                t,
                "own",
                format!("tenant {} attaches its own worker", t.name),
            )
        }
        Request::Open {
            pid,
            minor,
            image,
            read_only,
        } => {
            if let Some(d) = foreign_minor(t, *minor, view, false)
                .or_else(|| foreign_worker(t, *pid, view, false))
            {
                return d;
            }
            let d = Decision::allow(t, "own", String::new());
            with_image(t, peer, image, *read_only, d)
        }
        Request::Unpause { pid, minor, image } => {
            let admin_ok = image.is_none();
            if let Some(d) = foreign_minor(t, *minor, view, admin_ok)
                .or_else(|| foreign_worker(t, *pid, view, admin_ok))
            {
                return d;
            }
            let d = owned_or_admin(t, *minor, view);
            match image {
                // The new image must be one the minor's own tenant may open.
                Some(image) => {
                    // Unpause keeps the minor's read-only setting; the
                    // broker re-checks writability against it. Here the
                    // image is checked as read-only unless the tenant may
                    // write, so a read-only tenant can still swap images.
                    // A shared read-only root is checked as read-only
                    // too; the broker refuses to open it writable.
                    let ro = !t.writable || in_shared_root(t, &image.path);
                    with_image(t, peer, image, ro, d)
                }
                None => d,
            }
        }
        Request::Free { minor } => {
            foreign_minor(t, *minor, view, true).unwrap_or_else(|| owned_or_admin(t, *minor, view))
        }
        Request::Detach { pid, minor }
        | Request::Close { pid, minor, .. }
        | Request::Destroy { pid, minor }
        | Request::Pause { pid, minor }
        | Request::Stats { pid, minor }
        | Request::Coalesce { pid, minor, .. } => foreign_minor(t, *minor, view, true)
            .or_else(|| foreign_worker(t, *pid, view, true))
            .unwrap_or_else(|| owned_or_admin(t, *minor, view)),
        Request::Throttle { target, .. } => throttle(t, target),
        Request::Snapshot { pid, minor, child } => snapshot(t, peer, view, *pid, *minor, child),
        Request::Cbt(req) => crate::cbt::decide_cbt(t, req, view),
    }
}

/// `snapshot -n CHILD`: only on the tenant's own minor (the child is
/// created with her credentials and becomes her leaf), only if her policy
/// allows online snapshots, and CHILD must be a path she could open
/// read-write beneath her roots.
fn snapshot(
    t: &Tenant,
    peer: &PeerCred,
    view: &dyn BrokerView,
    pid: Option<u32>,
    minor: tapjail_common::Minor,
    child: &str,
) -> Decision {
    if let Some(d) =
        foreign_minor(t, minor, view, false).or_else(|| foreign_worker(t, pid, view, false))
    {
        return d;
    }
    if !t.online_snapshot {
        return Decision::deny(
            Some(t),
            "snapshot-off",
            format!(
                "tenant {} may not take online snapshots: its policy says online_snapshot = false \
                 (pause, snapshot offline with `tap-ctl vhd snapshot`, unpause -a)",
                t.name
            ),
        );
    }
    let spec = ImageSpec {
        kind: tapjail_common::proto::ImageKind::Vhd,
        path: child.to_string(),
    };
    let d = Decision::allow(t, "own", String::new());
    with_image(t, peer, &spec, false, d)
}

/// I/O limits are the host's to share out: only an admin tenant changes
/// them, even on its own disks (a tenant that could raise its own limit
/// would have none).
fn throttle(t: &Tenant, target: &tapjail_common::qos::ThrottleTarget) -> Decision {
    if t.admin {
        Decision::allow(
            t,
            "admin",
            format!("admin tenant {} sets I/O limits of {target}", t.name),
        )
    } else {
        Decision::deny(
            Some(t),
            "throttle-admin-only",
            format!(
                "tenant {} may not change I/O limits (of {target}): only an admin tenant may",
                t.name
            ),
        )
    }
}

/// Decide whether the worker serving `tenant`'s image `child` may have the
/// parent named by a locator read from that child. The child is trusted
/// (the broker opened it); the locator is not (it came out of the image).
/// Parents are always granted read-only.
pub fn decide_parent(
    policy: &Policy,
    tenant: &str,
    open_as: &OpenAs,
    child: &Path,
    locator: &str,
    relative: bool,
) -> Decision {
    let Some(t) = policy.tenant(tenant) else {
        return Decision::deny(
            None,
            "no-tenant",
            format!("tenant {tenant:?} is no longer in the policy"),
        );
    };
    let joined = if relative {
        match child.parent() {
            Some(dir) => dir.join(locator),
            None => PathBuf::from(locator),
        }
    } else {
        PathBuf::from(locator)
    };
    let path = match normalize_lexically(&joined) {
        Ok(p) => p,
        Err(e) => {
            return Decision::deny(
                Some(t),
                "bad-path",
                format!("parent locator {locator:?} of {}: {e}", child.display()),
            )
        }
    };
    match grant(t, open_as, &path, true) {
        Ok(g) => {
            let mut d = Decision::allow(
                t,
                "image-root",
                format!(
                    "parent {} of {} is under {}",
                    path.display(),
                    child.display(),
                    g.root.display()
                ),
            );
            d.image = Some(g);
            d
        }
        Err(d) => {
            let mut d = *d;
            d.reason = format!("parent of {}: {}", child.display(), d.reason);
            d
        }
    }
}

/// An online commit writes the served leaf's parent (`path`, a parent
/// the broker already opened for `tenant`) and makes it the leaf: it must
/// be beneath a root she may write, opened as `open_as`.
pub fn decide_commit_parent(
    policy: &Policy,
    tenant: &str,
    open_as: &OpenAs,
    path: &Path,
) -> Decision {
    let Some(t) = policy.tenant(tenant) else {
        return Decision::deny(
            None,
            "no-tenant",
            format!("tenant {tenant:?} is no longer in the policy"),
        );
    };
    match grant(t, open_as, path, false) {
        Ok(g) => {
            let mut d = Decision::allow(
                t,
                "image-root",
                format!("parent {} is under {}", path.display(), g.root.display()),
            );
            d.image = Some(g);
            d
        }
        Err(d) => *d,
    }
}

fn allocate(t: &Tenant, minor: Option<Minor>, view: &dyn BrokerView) -> Decision {
    let held = view.minors_of(&t.name);
    if held >= t.max_disks as usize {
        return Decision::deny(
            Some(t),
            "max-disks",
            format!(
                "tenant {} already holds {held} minor(s), its limit (max_disks = {})",
                t.name, t.max_disks
            ),
        );
    }
    let range = t.minors.unwrap_or((0, crate::config::MAX_MINOR));
    if let Some(m) = minor {
        if m.get() < range.0 || m.get() > range.1 {
            return Decision::deny(
                Some(t),
                "minor-range",
                format!(
                    "minor {m} is outside tenant {}'s minors {}..={}",
                    t.name, range.0, range.1
                ),
            );
        }
        if let Some(d) = foreign_minor(t, m, view, false) {
            return d;
        }
    }
    let mut d = Decision::allow(
        t,
        "own",
        format!("tenant {} holds {held} of {} minors", t.name, t.max_disks),
    );
    d.minors = Some(range);
    d
}

fn spawn(t: &Tenant, view: &dyn BrokerView) -> Decision {
    let n = view.workers_of(&t.name);
    if n >= t.max_disks as usize {
        return Decision::deny(
            Some(t),
            "max-disks",
            format!(
                "tenant {} already has {n} worker(s), its limit (max_disks = {})",
                t.name, t.max_disks
            ),
        );
    }
    Decision::allow(
        t,
        "own",
        format!("tenant {} has {n} of {} workers", t.name, t.max_disks),
    )
}

/// Denial when `minor` belongs to another tenant (unless `admin_ok` and
/// the tenant is admin). An unallocated minor is not foreign: the broker
/// reports it as not found.
pub(crate) fn foreign_minor(
    t: &Tenant,
    minor: Minor,
    view: &dyn BrokerView,
    admin_ok: bool,
) -> Option<Decision> {
    match view.minor_owner(minor) {
        Some(owner) if owner != t.name && !(admin_ok && t.admin) => Some(Decision::deny(
            Some(t),
            "foreign-minor",
            format!("minor {minor} does not belong to tenant {}", t.name),
        )),
        _ => None,
    }
}

fn foreign_worker(
    t: &Tenant,
    pid: Option<u32>,
    view: &dyn BrokerView,
    admin_ok: bool,
) -> Option<Decision> {
    let pid = pid?;
    match view.worker_owner(pid) {
        Some(owner) if owner != t.name && !(admin_ok && t.admin) => Some(Decision::deny(
            Some(t),
            "foreign-worker",
            format!("tapdisk {pid} does not belong to tenant {}", t.name),
        )),
        _ => None,
    }
}

pub(crate) fn owned_or_admin(t: &Tenant, minor: Minor, view: &dyn BrokerView) -> Decision {
    match view.minor_owner(minor) {
        Some(owner) if owner != t.name => {
            let mut d = Decision::allow(
                t,
                "admin",
                format!("admin tenant {} acts on {owner}'s minor {minor}", t.name),
            );
            d.scope = Scope::All;
            d
        }
        Some(_) => Decision::allow(
            t,
            "own",
            format!("minor {minor} belongs to tenant {}", t.name),
        ),
        None => Decision::allow(t, "absent", format!("minor {minor} is not allocated")),
    }
}

/// Whether `path` lies in one of `t`'s `shared_readonly` roots.
fn in_shared_root(t: &Tenant, path: &str) -> bool {
    normalize_absolute(Path::new(path))
        .ok()
        .and_then(|p| under_root(&p, &t.image_roots).map(|(root, _)| root.to_path_buf()))
        .is_some_and(|root| t.shared_roots.contains(&root))
}

fn with_image(
    t: &Tenant,
    peer: &PeerCred,
    image: &ImageSpec,
    read_only: bool,
    base: Decision,
) -> Decision {
    let path = match normalize_absolute(Path::new(&image.path)) {
        Ok(p) => p,
        Err(e) => {
            let rule = if e == PathError::DotDot {
                "path-escape"
            } else {
                "bad-path"
            };
            return Decision::deny(Some(t), rule, format!("image path {:?}: {e}", image.path));
        }
    };
    match grant(t, &OpenAs::peer(peer, t), &path, read_only) {
        Ok(g) => Decision {
            rule: if base.rule == "own" {
                "image-root"
            } else {
                base.rule
            },
            reason: format!("{} is under {}", g.path.display(), g.root.display()),
            image: Some(g),
            ..base
        },
        Err(d) => *d,
    }
}

pub(crate) fn grant(
    t: &Tenant,
    open_as: &OpenAs,
    path: &Path,
    read_only: bool,
) -> Result<ImageGrant, Box<Decision>> {
    if t.image_roots.iter().any(|r| r == path) {
        return Err(Box::new(Decision::deny(
            Some(t),
            "outside-roots",
            format!(
                "{} is an image root of tenant {}, not an image: name an image file under it",
                path.display(),
                t.name
            ),
        )));
    }
    let Some((root, relative)) = under_root(path, &t.image_roots) else {
        let roots: Vec<String> = t
            .image_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Err(Box::new(Decision::deny(
            Some(t),
            "outside-roots",
            format!(
                "{} is outside tenant {}'s image roots ({})",
                path.display(),
                t.name,
                if roots.is_empty() {
                    "none".to_string()
                } else {
                    roots.join(", ")
                }
            ),
        )));
    };
    if !read_only && !t.writable {
        return Err(Box::new(Decision::deny(
            Some(t),
            "read-only-tenant",
            format!("tenant {} may open images read-only only (use -R)", t.name),
        )));
    }
    let shared = t.shared_roots.iter().any(|r| r == root);
    if shared && !read_only {
        return Err(Box::new(Decision::deny(
            Some(t),
            "shared-readonly",
            format!(
                "{} is in the shared read-only image root {}: open it with -R (or use it as \
                 a parent)",
                path.display(),
                root.display()
            ),
        )));
    }
    Ok(ImageGrant {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        relative,
        read_only,
        open_as: open_as.clone(),
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tapjail_common::proto::ImageKind;

    const POLICY: &str = r#"
worker_uids = [300000, 300999]
[[tenant]]
name = "alice"
uids = [1000]
image_roots = ["/srv/alice", "/srv/shared/gold", { path = "/srv/gold", shared_readonly = true }]
writable = true
max_disks = 2
minors = [0, 9]

[[tenant]]
name = "bob"
gids = [2000]
image_roots = ["/srv/bob"]
writable = false
max_disks = 1

[[tenant]]
name = "ops"
uids = [0]
image_roots = ["/srv/ops"]
writable = true
admin = true
"#;

    #[derive(Default)]
    struct View {
        minors: HashMap<u16, String>,
        workers: HashMap<u32, String>,
    }

    impl BrokerView for View {
        fn minor_owner(&self, minor: Minor) -> Option<&str> {
            self.minors.get(&minor.get()).map(String::as_str)
        }
        fn worker_owner(&self, pid: u32) -> Option<&str> {
            self.workers.get(&pid).map(String::as_str)
        }
        fn minors_of(&self, tenant: &str) -> usize {
            self.minors.values().filter(|t| *t == tenant).count()
        }
        fn workers_of(&self, tenant: &str) -> usize {
            self.workers.values().filter(|t| *t == tenant).count()
        }
    }

    fn policy() -> Policy {
        Policy::parse(POLICY).unwrap()
    }

    /// alice holds minor 1 with worker 100; bob holds minor 20 with worker 200.
    fn view() -> View {
        let mut v = View::default();
        v.minors.insert(1, "alice".into());
        v.workers.insert(100, "alice".into());
        v.minors.insert(20, "bob".into());
        v.workers.insert(200, "bob".into());
        v
    }

    const ALICE: PeerCred = PeerCred {
        pid: 1,
        uid: 1000,
        gid: 1000,
    };
    const BOB: PeerCred = PeerCred {
        pid: 2,
        uid: 1500,
        gid: 2000,
    };
    const OPS: PeerCred = PeerCred {
        pid: 3,
        uid: 0,
        gid: 0,
    };
    const NOBODY: PeerCred = PeerCred {
        pid: 4,
        uid: 31337,
        gid: 31337,
    };

    fn m(n: u16) -> Minor {
        Minor::new(u64::from(n)).unwrap()
    }

    fn img(path: &str) -> ImageSpec {
        ImageSpec {
            kind: ImageKind::Vhd,
            path: path.into(),
        }
    }

    /// Every request that acts on an existing minor (and worker).
    fn requests_on(minor: u16, pid: u32, path: &str) -> Vec<Request> {
        let minor = m(minor);
        vec![
            Request::Free { minor },
            Request::Attach { pid, minor },
            Request::Detach {
                pid: Some(pid),
                minor,
            },
            Request::Open {
                pid: Some(pid),
                minor,
                image: img(path),
                read_only: true,
            },
            Request::Close {
                pid: Some(pid),
                minor,
                force: false,
            },
            Request::Close {
                pid: None,
                minor,
                force: true,
            },
            Request::Destroy {
                pid: Some(pid),
                minor,
            },
            Request::Pause {
                pid: Some(pid),
                minor,
            },
            Request::Unpause {
                pid: Some(pid),
                minor,
                image: None,
            },
            Request::Unpause {
                pid: None,
                minor,
                image: Some(img(path)),
            },
            Request::Stats {
                pid: Some(pid),
                minor,
            },
            Request::Stats { pid: None, minor },
            Request::Snapshot {
                pid: Some(pid),
                minor,
                child: path.into(),
            },
            Request::Coalesce {
                pid: Some(pid),
                minor,
                direction: tapjail_common::coalesce::Direction::Commit,
                rate: 0,
            },
        ]
    }

    fn every_request() -> Vec<Request> {
        let mut v = requests_on(1, 100, "/srv/alice/a.vhd");
        v.extend([
            Request::Hello { version: 1 },
            Request::Allocate { minor: None },
            Request::Allocate { minor: Some(m(3)) },
            Request::Spawn,
            Request::Create {
                image: img("/srv/alice/a.vhd"),
                read_only: false,
                minor: None,
            },
            Request::List {
                pid: None,
                minor: None,
            },
        ]);
        v
    }

    #[test]
    fn decide_peer_matching_no_tenant_is_refused_everything() {
        let (p, v) = (policy(), view());
        for req in every_request() {
            let d = decide(&req, &NOBODY, &p, &v);
            assert!(!d.allow, "{req:?}");
            assert_eq!(d.rule, "no-tenant");
            assert!(d.tenant.is_none());
            assert!(d.reason.contains("31337"));
        }
    }

    #[test]
    fn decide_cross_tenant_requests_are_all_denied() {
        let (p, v) = (policy(), view());
        for req in requests_on(20, 200, "/srv/alice/a.vhd") {
            let d = decide(&req, &ALICE, &p, &v);
            assert!(!d.allow, "alice on bob's: {req:?}");
            assert_eq!(d.rule, "foreign-minor", "{req:?}");
        }
        for req in requests_on(1, 100, "/srv/bob/b.vhd") {
            let d = decide(&req, &BOB, &p, &v);
            assert!(!d.allow, "bob on alice's: {req:?}");
            assert_eq!(d.rule, "foreign-minor", "{req:?}");
        }
    }

    #[test]
    fn decide_own_minor_with_foreign_pid_is_denied() {
        let (p, v) = (policy(), view());
        for req in requests_on(1, 200, "/srv/alice/a.vhd") {
            if matches!(
                req,
                Request::Free { .. }
                    | Request::Close { pid: None, .. }
                    | Request::Stats { pid: None, .. }
                    | Request::Unpause { pid: None, .. }
            ) {
                continue; // no pid in these
            }
            let d = decide(&req, &ALICE, &p, &v);
            assert!(!d.allow, "{req:?}");
            assert_eq!(d.rule, "foreign-worker", "{req:?}");
        }
    }

    #[test]
    fn decide_own_requests_are_allowed() {
        let (p, v) = (policy(), view());
        for req in requests_on(1, 100, "/srv/alice/a.vhd") {
            let d = decide(&req, &ALICE, &p, &v);
            assert!(d.allow, "{req:?}: {}", d.reason);
            assert_eq!(d.tenant.as_deref(), Some("alice"));
            assert_eq!(d.scope, Scope::Own);
        }
    }

    #[test]
    fn decide_admin_manages_but_never_opens_or_attaches_foreign_disks() {
        let (p, v) = (policy(), view());
        for req in requests_on(20, 200, "/srv/ops/x.vhd") {
            let d = decide(&req, &OPS, &p, &v);
            let opens = matches!(
                req,
                Request::Attach { .. }
                    | Request::Open { .. }
                    | Request::Unpause { image: Some(_), .. }
                    | Request::Snapshot { .. }
            );
            assert_eq!(d.allow, !opens, "{req:?}: {}", d.reason);
            if d.allow {
                assert_eq!(d.rule, "admin");
            }
        }
        let d = decide(
            &Request::List {
                pid: None,
                minor: None,
            },
            &OPS,
            &p,
            &v,
        );
        assert_eq!((d.allow, d.scope), (true, Scope::All));
    }

    #[test]
    fn decide_snapshot_needs_the_tenants_policy_a_writable_root_and_a_path_inside() {
        let v = view();
        let snap = |child: &str| Request::Snapshot {
            pid: None,
            minor: m(1),
            child: child.into(),
        };
        let d = decide(&snap("/srv/alice/s.vhd"), &ALICE, &policy(), &v);
        assert!(d.allow, "{}", d.reason);
        let g = d.image.unwrap();
        assert!(!g.read_only);
        assert_eq!(g.open_as.uid, 1000, "created with the peer's credentials");
        for (child, rule) in [
            ("/srv/bob/s.vhd", "outside-roots"),
            ("/srv/alice/../bob/s.vhd", "path-escape"),
            ("/srv/gold/s.vhd", "shared-readonly"),
            ("s.vhd", "bad-path"),
        ] {
            let d = decide(&snap(child), &ALICE, &policy(), &v);
            assert_eq!((d.allow, d.rule), (false, rule), "{child}: {}", d.reason);
        }
        let off = Policy::parse(
            &POLICY.replace("max_disks = 2", "max_disks = 2\nonline_snapshot = false"),
        )
        .unwrap();
        let d = decide(&snap("/srv/alice/s.vhd"), &ALICE, &off, &v);
        assert_eq!((d.allow, d.rule), (false, "snapshot-off"));
        assert!(d.reason.contains("online_snapshot = false"), "{}", d.reason);
    }

    #[test]
    fn decide_throttle_is_admin_only_even_on_own_disks() {
        use tapjail_common::qos::{Knob, Rate, ThrottleTarget};
        let (p, v) = (policy(), view());
        let change = vec![(Knob::WriteIops, Some(Rate::with_default_burst(1000)))];
        for target in [
            ThrottleTarget::Minor(m(1)),
            ThrottleTarget::Tenant("alice".into()),
        ] {
            let req = Request::Throttle {
                target: target.clone(),
                changes: change.clone(),
            };
            let d = decide(&req, &ALICE, &p, &v);
            assert!(!d.allow, "{target}");
            assert_eq!(d.rule, "throttle-admin-only");
            assert!(d.reason.contains("only an admin"), "{}", d.reason);
            let d = decide(&req, &OPS, &p, &v);
            assert!(d.allow && d.rule == "admin", "{}", d.reason);
        }
    }

    #[test]
    fn decide_list_scope_is_own_for_tenants() {
        let (p, v) = (policy(), view());
        for peer in [ALICE, BOB] {
            let d = decide(
                &Request::List {
                    pid: None,
                    minor: None,
                },
                &peer,
                &p,
                &v,
            );
            assert_eq!((d.allow, d.scope), (true, Scope::Own));
        }
    }

    #[test]
    fn decide_root_is_nobody_special_without_a_tenant() {
        let p = Policy::parse("[[tenant]]\nname = \"a\"\nuids = [5]\n").unwrap();
        let d = decide(
            &Request::List {
                pid: None,
                minor: None,
            },
            &OPS,
            &p,
            &view(),
        );
        assert!(!d.allow);
        assert_eq!(d.rule, "no-tenant");
    }

    #[test]
    fn decide_unallocated_minor_is_left_to_the_broker() {
        let (p, v) = (policy(), view());
        let d = decide(&Request::Free { minor: m(5) }, &ALICE, &p, &v);
        assert_eq!((d.allow, d.rule), (true, "absent"));
    }

    #[test]
    fn decide_max_disks_limits_allocate_spawn_and_create() {
        let (p, mut v) = (policy(), view());
        assert!(decide(&Request::Allocate { minor: None }, &ALICE, &p, &v).allow);
        assert!(decide(&Request::Spawn, &ALICE, &p, &v).allow);
        v.minors.insert(2, "alice".into());
        let d = decide(&Request::Allocate { minor: None }, &ALICE, &p, &v);
        assert_eq!((d.allow, d.rule), (false, "max-disks"));
        let create = Request::Create {
            image: img("/srv/alice/a.vhd"),
            read_only: false,
            minor: None,
        };
        assert_eq!(decide(&create, &ALICE, &p, &v).rule, "max-disks");
        v.minors.remove(&2);
        v.workers.insert(101, "alice".into());
        assert_eq!(decide(&Request::Spawn, &ALICE, &p, &v).rule, "max-disks");
        let d = decide(&create, &ALICE, &p, &v);
        assert_eq!((d.allow, d.rule), (false, "max-disks"));
        // bob's limit is 1 and he holds one.
        assert!(!decide(&Request::Allocate { minor: None }, &BOB, &p, &v).allow);
    }

    #[test]
    fn decide_allocate_respects_minor_range() {
        let (p, v) = (policy(), view());
        let d = decide(&Request::Allocate { minor: None }, &ALICE, &p, &v);
        assert_eq!(d.minors, Some((0, 9)));
        let d = decide(&Request::Allocate { minor: Some(m(10)) }, &ALICE, &p, &v);
        assert_eq!((d.allow, d.rule), (false, "minor-range"));
        let d = decide(&Request::Allocate { minor: Some(m(9)) }, &ALICE, &p, &v);
        assert!(d.allow);
        // No range configured: any minor.
        let mut v2 = View::default();
        v2.minors.insert(20, "bob".into());
        let d = decide(
            &Request::Allocate { minor: None },
            &BOB,
            &p,
            &View::default(),
        );
        assert_eq!(d.minors, Some((0, 16383)));
        let d = decide(&Request::Allocate { minor: Some(m(20)) }, &ALICE, &p, &v2);
        assert_eq!(d.rule, "minor-range");
    }

    fn alice_as() -> OpenAs {
        OpenAs {
            uid: 1000,
            gid: 1000,
            owners: vec![1000],
        }
    }

    #[test]
    fn decide_open_grant_opens_as_the_peer_and_owners_are_its_tenants_uids() {
        let (p, v) = (policy(), view());
        let req = Request::Open {
            pid: Some(100),
            minor: m(1),
            image: img("/srv/alice/a.img"),
            read_only: false,
        };
        let g = decide(&req, &ALICE, &p, &v).image.unwrap();
        assert_eq!(g.open_as, alice_as());
        assert!(!g.shared);
        // bob acts through his gid: the open is his uid and gid, and only
        // his own uid may own the file.
        let req = Request::Open {
            pid: Some(200),
            minor: m(5),
            image: img("/srv/bob/b.img"),
            read_only: true,
        };
        let g = decide(&req, &BOB, &p, &v).image.unwrap();
        assert_eq!(
            g.open_as,
            OpenAs {
                uid: 1500,
                gid: 2000,
                owners: vec![1500]
            }
        );
    }

    #[test]
    fn decide_shared_readonly_root_is_read_only_and_marked_shared() {
        let (p, v) = (policy(), view());
        let open = |read_only| Request::Open {
            pid: Some(100),
            minor: m(1),
            image: img("/srv/gold/base.vhd"),
            read_only,
        };
        let d = decide(&open(false), &ALICE, &p, &v);
        assert_eq!(
            (d.allow, d.rule),
            (false, "shared-readonly"),
            "{}",
            d.reason
        );
        assert!(d.reason.contains("-R"), "{}", d.reason);
        let d = decide(&open(true), &ALICE, &p, &v);
        assert!(d.allow, "{}", d.reason);
        let g = d.image.unwrap();
        assert!(g.shared && g.read_only);
        // A parent there is granted, shared.
        let d = decide_parent(
            &p,
            "alice",
            &alice_as(),
            Path::new("/srv/alice/leaf.vhd"),
            "/srv/gold/base.vhd",
            false,
        );
        assert!(d.allow && d.image.unwrap().shared);
        // Unpause onto a gold master is checked as read-only (the broker
        // keeps the paused disk's mode and refuses a writable one).
        let d = decide(
            &Request::Unpause {
                pid: None,
                minor: m(1),
                image: Some(img("/srv/gold/base.vhd")),
            },
            &ALICE,
            &p,
            &v,
        );
        assert!(d.allow && d.image.unwrap().shared, "{}", d.reason);
        // An ordinary root is not shared.
        let d = decide_parent(
            &p,
            "alice",
            &alice_as(),
            Path::new("/srv/alice/leaf.vhd"),
            "/srv/shared/gold/g.vhd",
            false,
        );
        assert!(!d.image.unwrap().shared);
    }

    #[test]
    fn decide_open_grants_path_under_the_longest_root() {
        let (p, v) = (policy(), view());
        let req = Request::Open {
            pid: Some(100),
            minor: m(1),
            image: img("/srv/shared/gold//base.vhd"),
            read_only: false,
        };
        let d = decide(&req, &ALICE, &p, &v);
        assert!(d.allow, "{}", d.reason);
        let g = d.image.unwrap();
        assert_eq!(g.root, Path::new("/srv/shared/gold"));
        assert_eq!(g.relative, Path::new("base.vhd"));
        assert_eq!(g.path, Path::new("/srv/shared/gold/base.vhd"));
        assert!(!g.read_only);
        assert_eq!(d.rule, "image-root");
    }

    #[test]
    fn decide_open_refuses_escapes_and_foreign_roots() {
        let (p, v) = (policy(), view());
        let cases = [
            ("/srv/alice/../bob/b.vhd", "path-escape"),
            ("/srv/alice/x/../../etc/shadow", "path-escape"),
            ("srv/alice/a.vhd", "bad-path"),
            ("/srv/bob/b.vhd", "outside-roots"),
            ("/srv/alicex/a.vhd", "outside-roots"),
            ("/srv/alice", "outside-roots"),
            ("/etc/shadow", "outside-roots"),
        ];
        for (path, rule) in cases {
            let req = Request::Open {
                pid: Some(100),
                minor: m(1),
                image: img(path),
                read_only: true,
            };
            let d = decide(&req, &ALICE, &p, &v);
            assert_eq!((d.allow, d.rule), (false, rule), "{path}: {}", d.reason);
            assert!(d.image.is_none());
            let create = Request::Create {
                image: img(path),
                read_only: true,
                minor: None,
            };
            assert_eq!(decide(&create, &ALICE, &p, &v).rule, rule, "create {path}");
        }
    }

    #[test]
    fn decide_open_of_an_image_root_itself_says_it_is_the_root() {
        let (p, v) = (policy(), view());
        let req = Request::Open {
            pid: Some(100),
            minor: m(1),
            image: img("/srv/alice"),
            read_only: true,
        };
        let d = decide(&req, &ALICE, &p, &v);
        assert_eq!((d.allow, d.rule), (false, "outside-roots"));
        assert!(
            d.reason
                .contains("is an image root of tenant alice, not an image"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn decide_read_only_tenant_needs_dash_r() {
        let (p, mut v) = (policy(), view());
        v.minors.clear();
        v.workers.clear();
        let rw = Request::Create {
            image: img("/srv/bob/b.vhd"),
            read_only: false,
            minor: None,
        };
        let d = decide(&rw, &BOB, &p, &v);
        assert_eq!((d.allow, d.rule), (false, "read-only-tenant"));
        let ro = Request::Create {
            image: img("/srv/bob/b.vhd"),
            read_only: true,
            minor: None,
        };
        let d = decide(&ro, &BOB, &p, &v);
        assert!(d.allow);
        assert!(d.image.unwrap().read_only);
        assert_eq!(d.minors, Some((0, 16383)));
    }

    #[test]
    fn decide_unpause_with_image_checks_the_new_image() {
        let (p, v) = (policy(), view());
        let ok = Request::Unpause {
            pid: None,
            minor: m(1),
            image: Some(img("/srv/alice/new.vhd")),
        };
        let d = decide(&ok, &ALICE, &p, &v);
        assert!(d.allow);
        assert_eq!(d.image.unwrap().relative, Path::new("new.vhd"));
        let bad = Request::Unpause {
            pid: None,
            minor: m(1),
            image: Some(img("/srv/bob/b.vhd")),
        };
        assert_eq!(decide(&bad, &ALICE, &p, &v).rule, "outside-roots");
    }

    #[test]
    fn decide_parent_relative_locator_inside_roots_is_read_only() {
        let p = policy();
        let d = decide_parent(
            &p,
            "alice",
            &alice_as(),
            Path::new("/srv/alice/vms/leaf.vhd"),
            "../base.vhd",
            true,
        );
        assert!(d.allow, "{}", d.reason);
        let g = d.image.unwrap();
        assert_eq!(g.path, Path::new("/srv/alice/base.vhd"));
        assert!(g.read_only);
        let d = decide_parent(
            &p,
            "alice",
            &alice_as(),
            Path::new("/srv/alice/leaf.vhd"),
            "/srv/shared/gold/g.vhd",
            false,
        );
        assert!(d.allow);
    }

    #[test]
    fn decide_parent_outside_roots_is_refused() {
        let p = policy();
        let child = Path::new("/srv/alice/leaf.vhd");
        for (loc, rel, rule) in [
            ("../bob/b.vhd", true, "outside-roots"),
            ("../../../../../etc/shadow", true, "bad-path"),
            ("/srv/bob/b.vhd", false, "outside-roots"),
            ("C:\\base.vhd", false, "bad-path"),
            ("/srv/alice", false, "outside-roots"),
        ] {
            let d = decide_parent(&p, "alice", &alice_as(), child, loc, rel);
            assert_eq!((d.allow, d.rule), (false, rule), "{loc}: {}", d.reason);
            assert!(d.reason.contains("leaf.vhd"));
        }
        let d = decide_parent(&p, "mallory", &alice_as(), child, "/srv/alice/x", false);
        assert_eq!(d.rule, "no-tenant");
    }

    #[test]
    fn decide_hello_identifies_tenant_by_uid_then_gid() {
        let (p, v) = (policy(), view());
        assert_eq!(
            decide(&Request::Hello { version: 1 }, &ALICE, &p, &v)
                .tenant
                .as_deref(),
            Some("alice")
        );
        assert_eq!(
            decide(&Request::Hello { version: 1 }, &BOB, &p, &v)
                .tenant
                .as_deref(),
            Some("bob")
        );
    }
}
