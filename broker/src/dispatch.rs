//! A request's way through the broker: policy decision, the decision's
//! audit line, the operation, the outcome's audit line, the reply.
//!
//! The decision and the start of the operation happen under one lock of
//! the table, so ownership cannot change between them. A panic inside an
//! operation is caught here: the request fails with an error, the panic is
//! audited, the minor it held is given back by its lease, and the client's
//! thread serves on.

use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::table::Table;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use tapjail_broker::phases;
use tapjail_common::proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};
use tapjail_policy::{decide, Decision, PeerCred};

/// A request's verb for its phase line (`Create`, `Destroy`, ...).
fn op_name(req: &Request) -> String {
    match req {
        Request::WithOptions { req, .. } => op_name(req),
        r => {
            let d = format!("{r:?}");
            d.split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or("")
                .to_lowercase()
        }
    }
}

/// Whether `req` changes state (and so is audited before it is carried out).
pub(crate) fn changes_state(req: &Request) -> bool {
    match req {
        Request::WithOptions { req, .. } => changes_state(req),
        r => !matches!(
            r,
            Request::Hello { .. } | Request::List { .. } | Request::Stats { .. } | Request::Major
        ),
    }
}

/// The minor a request names, to respawn its worker if a panic left it dead.
fn minor_of(req: &Request) -> Option<tapjail_common::Minor> {
    match req {
        Request::Free { minor }
        | Request::Attach { minor, .. }
        | Request::Detach { minor, .. }
        | Request::Open { minor, .. }
        | Request::Close { minor, .. }
        | Request::Destroy { minor, .. }
        | Request::Pause { minor, .. }
        | Request::Unpause { minor, .. }
        | Request::Stats { minor, .. }
        | Request::Snapshot { minor, .. }
        | Request::Coalesce { minor, .. }
        | Request::Cbt(tapjail_common::cbt::CbtRequest { minor, .. })
        | Request::Throttle {
            target: tapjail_common::qos::ThrottleTarget::Minor(minor),
            ..
        } => Some(*minor),
        Request::WithOptions { req, .. } => minor_of(req),
        _ => None,
    }
}

/// The image path a request names, if any.
fn image_of(req: &Request) -> Option<&str> {
    match req {
        Request::Open { image, .. } | Request::Create { image, .. } => Some(&image.path),
        Request::Unpause { image, .. } => image.as_ref().map(|i| i.path.as_str()),
        Request::WithOptions { req, .. } => image_of(req),
        _ => None,
    }
}

/// The `request` span: the verb, a per-broker request id (to tell apart
/// the lines of concurrent requests), the peer, its tenant, and the minor
/// and image named. Every event logged while the request is served (in
/// `ops`, `bringup`, `supervisor`) carries these fields.
fn request_span(peer: &PeerCred, req: &Request, d: &Decision) -> tracing::Span {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    tracing::info_span!(
        "request",
        op = req.verb(),
        id = NEXT.fetch_add(1, Ordering::Relaxed),
        uid = peer.uid,
        peer_pid = peer.pid,
        tenant = d.tenant.as_deref(),
        minor = minor_of(req).map(tapjail_common::Minor::get),
        image = image_of(req),
    )
}

impl Broker {
    /// Decide, audit the decision, execute, audit the outcome, reply.
    pub fn handle(self: &Arc<Self>, peer: &PeerCred, req: &Request) -> Reply {
        phases::begin();
        let reply = self.handle_timed(peer, req);
        if phases::enabled() {
            phases::end(&op_name(req));
        }
        reply
    }

    fn handle_timed(self: &Arc<Self>, peer: &PeerCred, req: &Request) -> Reply {
        if let Err(e) = self.audit_healthy() {
            return e.reply();
        }
        if self.stopping.load(Ordering::SeqCst) {
            return BrokerError::failed("tap-broker is shutting down").reply();
        }
        let t = self.table();
        phases::lap("table_lock");
        let d = decide(req, peer, &self.policy, &*t);
        phases::lap("policy");
        // Every event while this request is served names it (see `request_span`).
        let span = request_span(peer, req, &d);
        let _serving = span.enter();
        if !d.allow {
            drop(t);
            let result = Err(BrokerError::denied(d.reason.clone()));
            return self.finish(peer, req, &d, result);
        }
        // Fail closed: nothing is done that is not on record first.
        if changes_state(req) {
            if let Err(e) = self.audit_decision(peer, req, &d) {
                return e.reply();
            }
            phases::lap("audit_decision");
        }
        let run = catch_unwind(AssertUnwindSafe(|| self.execute(t, req, &d)));
        let result = match run {
            Ok(r) => r,
            Err(panic) => {
                let what = panic_text(&*panic);
                tracing::error!("panic while serving {req:?}: {what}");
                self.audit_panic(peer, req, &d, &what);
                if let Some(m) = minor_of(req) {
                    self.after_op(m);
                }
                return BrokerError::failed(format!(
                    "tap-broker hit an internal error ({what}); nothing was changed on the minor it held: report this bug"
                ))
                .reply();
            }
        };
        self.finish(peer, req, &d, result)
    }

    fn finish(
        &self,
        peer: &PeerCred,
        req: &Request,
        d: &Decision,
        result: Result<Done, BrokerError>,
    ) -> Reply {
        phases::lap("op_rest");
        let result = result.map_err(crate::host_limits::explain);
        if let Err(e) = self.audit_outcome(peer, req, d, &result) {
            return e.reply();
        }
        phases::lap("audit_outcome");
        match &result {
            Ok(_) => tracing::debug!(rule = d.rule, "done"),
            Err(e) => tracing::debug!(rule = d.rule, "refused or failed: {e}"),
        }
        match result {
            Ok((reply, _)) => reply,
            Err(e) => e.reply(),
        }
    }

    pub(crate) fn execute(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        req: &Request,
        d: &Decision,
    ) -> Result<Done, BrokerError> {
        let tenant = d
            .tenant
            .clone()
            .ok_or_else(|| BrokerError::failed("policy allowed a request without a tenant"))?;
        match req {
            Request::Hello { version } => {
                drop(t);
                if *version != PROTOCOL_VERSION {
                    return Err(BrokerError::new(
                        ErrorKind::Version,
                        format!(
                            "tap-ctl speaks protocol {version}, this tap-broker speaks {PROTOCOL_VERSION}: use matching versions"
                        ),
                    ));
                }
                Ok((
                    Reply::Hello {
                        version: PROTOCOL_VERSION,
                    },
                    format!("tenant {tenant}"),
                ))
            }
            Request::List { pid, minor } => {
                let mut rows: Vec<_> = t
                    .list(&tenant, d.scope)
                    .into_iter()
                    .filter(|r| pid.is_none_or(|p| r.pid == Some(p)))
                    .filter(|r| minor.is_none_or(|m| r.minor == Some(m)))
                    .collect();
                self.mirrors.fill_list(&mut rows);
                let n = rows.len();
                Ok((Reply::List(rows), format!("{n} row(s)")))
            }
            Request::Allocate { minor } => self.op_allocate(t, &tenant, d, *minor),
            Request::Free { minor } => self.op_free(t, *minor),
            Request::Spawn => self.op_spawn(t, &tenant),
            Request::Attach { pid, minor } => self.op_attach(t, *pid, *minor),
            Request::Detach { pid, minor } => self.op_detach(t, *pid, *minor),
            Request::Open {
                pid,
                minor,
                image,
                read_only,
            } => self.op_open(t, *pid, *minor, image.kind, d, *read_only),
            Request::Close { pid, minor, force } => self.op_close(t, *pid, *minor, *force),
            Request::Create {
                image,
                read_only,
                minor,
            } => self.op_create(t, &tenant, d, image.kind, *read_only, *minor),
            Request::Destroy { pid, minor } => self.op_destroy(t, *pid, *minor),
            Request::Pause { pid, minor } => self.op_pause(t, *pid, *minor),
            Request::Unpause { pid, minor, image } => {
                self.op_unpause(t, *pid, *minor, image.as_ref().map(|i| i.kind), d)
            }
            Request::Stats { pid, minor } => self.op_stats(t, *pid, *minor),
            Request::Throttle { target, changes } => self.op_throttle(t, target, changes),
            Request::WithOptions { req, opts } => self.op_with_options(t, req, opts, d),
            Request::Major => self.op_major(t),
            Request::Snapshot { pid, minor, .. } => self.op_snapshot(t, *pid, *minor, d),
            Request::Cbt(req) => self.op_cbt(t, req),
            Request::Coalesce {
                pid,
                minor,
                direction,
                rate,
            } => self.op_coalesce(t, *pid, *minor, *direction, *rate),
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::SpawnConfig;
    use crate::device::factory::DeviceFactory;
    use crate::records::StateDir;
    use std::path::Path;
    use std::time::Duration;
    use tapjail_common::audit::AuditLog;
    use tapjail_common::Minor;
    use tapjail_policy::Policy;
    use tapjail_testsupport::Immutable;

    /// A broker serving uid 0 as tenant `root`, NBD frontend, no worker
    /// binary (enough for the requests that need no worker).
    fn broker(dir: &Path) -> Arc<Broker> {
        let text = format!(
            "socket = {:?}\naudit_log = {:?}\nstate_dir = {:?}\ndevice_dir = {:?}\nfrontend = \"nbd\"\n\
             [[tenant]]\nname = \"root\"\nuids = [0]\nimage_roots = [{:?}]\nadmin = true\n",
            dir.join("sock"),
            dir.join("audit.jsonl"),
            dir.join("state"),
            dir.join("dev"),
            dir.join("images"),
        );
        let policy = Policy::parse(&text).expect("policy");
        let audit = AuditLog::open(&dir.join("audit.jsonl")).expect("audit");
        let devices = DeviceFactory::new(policy.frontend, &dir.join("state"), Path::new("/dev"))
            .expect("nbd");
        let state = StateDir::create(&dir.join("state")).expect("state");
        let spawn = SpawnConfig {
            tapdisk: dir.join("no-tapdisk"),
            memlock: 0,
            timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(1),
            store: None,
            cgroups: Arc::new(tapjail_broker::cgroup::Cgroups::off()),
        };
        Arc::new(Broker::new(policy, audit, devices, state, spawn).expect("broker"))
    }

    const ROOT: PeerCred = PeerCred {
        pid: 1,
        uid: 0,
        gid: 0,
    };

    fn m(n: u64) -> Minor {
        Minor::new(n).unwrap()
    }

    fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn panic_inside_an_operation_is_answered_audited_and_leaves_the_minor_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let b = broker(tmp.path());
        let alloc = Request::Allocate { minor: Some(m(3)) };
        assert!(matches!(b.handle(&ROOT, &alloc), Reply::Allocated { .. }));
        crate::faults::panic_at("destroy");
        let destroy = Request::Destroy {
            pid: None,
            minor: m(3),
        };
        // The panic happens with minor 3 leased; this thread survives it.
        let r = b.handle(&ROOT, &destroy);
        let Reply::Error { kind, message } = r else {
            panic!("{r:?}")
        };
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.contains("internal error"), "{message}");
        let last = audit_lines(tmp.path()).pop().unwrap();
        assert!(
            last["outcome"].as_str().unwrap().contains("panic"),
            "{last}"
        );
        // The lease gave the minor back: listed, idle, destroyable.
        let list = b.handle(
            &ROOT,
            &Request::List {
                pid: None,
                minor: None,
            },
        );
        let Reply::List(rows) = list else {
            panic!("{list:?}")
        };
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].minor, Some(m(3)));
        assert_eq!(b.handle(&ROOT, &destroy), Reply::Ok);
        // And the minor can be allocated again.
        assert!(matches!(b.handle(&ROOT, &alloc), Reply::Allocated { .. }));
    }

    #[test]
    fn decision_line_precedes_the_act_and_a_failed_one_refuses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let b = broker(tmp.path());
        let alloc = Request::Allocate { minor: Some(m(5)) };
        assert!(matches!(b.handle(&ROOT, &alloc), Reply::Allocated { .. }));
        let lines = audit_lines(tmp.path());
        let [decision, outcome] = &lines[lines.len() - 2..] else {
            unreachable!()
        };
        assert_eq!(decision["outcome"], crate::audit::PENDING, "{decision}");
        assert_eq!(decision["decision"], "allow");
        assert!(outcome["outcome"].as_str().unwrap().starts_with("ok"));
        // The decision line of the next request cannot be written (the
        // file is made immutable under the open fd: writes fail EPERM): it
        // is refused and minor 6 is never allocated.
        let _immutable = Immutable::set(&tmp.path().join("audit.jsonl"));
        let r = b.handle(&ROOT, &Request::Allocate { minor: Some(m(6)) });
        assert!(
            matches!(&r, Reply::Error { message, .. } if message.contains("audit log")),
            "{r:?}"
        );
        assert!(!b.table().disks.contains_key(&m(6)));
        assert!(b.state.lock_minor(m(6)).unwrap().is_some(), "no lock taken");
    }

    /// A hello (every tap-ctl call starts with one) and a list are in the
    /// file at once but cost no fsync of their own; a request that acts
    /// waits for its lines, and that wait covers the lazy lines before it.
    #[test]
    fn lines_that_change_nothing_are_written_at_once_and_synced_later() {
        let tmp = tempfile::tempdir().unwrap();
        let b = broker(tmp.path());
        let before = b.commit.syncs();
        let hello = Request::Hello {
            version: tapjail_common::proto::PROTOCOL_VERSION,
        };
        assert!(matches!(b.handle(&ROOT, &hello), Reply::Hello { .. }));
        let list = Request::List {
            pid: None,
            minor: None,
        };
        assert!(matches!(b.handle(&ROOT, &list), Reply::List(_)));
        assert_eq!(
            b.commit.syncs(),
            before,
            "a hello or list waited for an fsync"
        );
        let lines = audit_lines(tmp.path());
        assert!(
            lines[lines.len() - 2]["request"]["Hello"].is_object(),
            "{lines:?}"
        );
        assert!(b.commit.behind().is_some());
        b.settle_lazy();
        assert_eq!(b.commit.syncs(), before + 1);
        assert!(b.commit.behind().is_none(), "settled");
        // An allocate waits for its decision and its outcome.
        assert!(matches!(
            b.handle(&ROOT, &Request::Allocate { minor: Some(m(4)) }),
            Reply::Allocated { .. }
        ));
        assert_eq!(b.commit.syncs(), before + 3);
        assert!(b.commit.behind().is_none());
    }
}
