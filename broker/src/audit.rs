//! The audit recorder: every line the broker writes is built here.
//!
//! Requests that change state get two lines: the decision, written (and
//! fsync'd) before the broker acts, with outcome `pending`; then the same
//! request with its outcome. If the decision cannot be written the request
//! is refused and nothing is done (fail closed), and from then on every
//! request is refused: the broker never acts without a record. Requests
//! that change nothing (hello, list, stats) and denials get one line.

use crate::broker::Broker;
use crate::denials::{Admit, Denials, Summary};
use crate::error::BrokerError;
use std::time::Instant;
use tapjail_common::audit::{Entry, Event, Peer, Verdict};
use tapjail_common::frame::FrameError;
use tapjail_common::proto::{ErrorKind, Request};
use tapjail_common::worker_proto::ParentLocator;
use tapjail_common::Minor;
use tapjail_policy::{Decision, PeerCred};

/// The outcome of a decision line: the broker acts next.
pub const PENDING: &str = "pending";

/// A successful request: what to reply and a short outcome for the audit log.
pub type Done = (tapjail_common::proto::Reply, String);

/// Who a parent-open line is about.
#[derive(Debug, Clone, Copy)]
pub struct ParentCtx<'a> {
    pub minor: Minor,
    pub owner: &'a str,
    pub worker_pid: u32,
    pub worker_uid: u32,
    pub child: &'a str,
}

/// A reaped worker, for its audit line.
#[derive(Debug)]
pub struct WorkerExit {
    pub pid: u32,
    pub uid: u32,
    pub owner: String,
    pub minor: Option<Minor>,
    /// Why the broker killed it, if it did.
    pub killed: Option<String>,
    /// The broker asked it to go.
    pub stopping: bool,
    pub exit: crate::sys::Exit,
}

impl Broker {
    /// Append to the audit log and return once the line is durable (its
    /// fsync shared with concurrent requests: `audit_commit`); on failure
    /// stop serving.
    pub fn audit(&self, entry: &Entry) -> Result<(), BrokerError> {
        let ticket = self.append(entry)?;
        self.commit.wait(ticket).map_err(|why| {
            let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
            self.audit_fails(&mut a, why)
        })
    }

    /// Append a line that records what changed nothing (a hello, a list,
    /// a worker that stopped when told to) without waiting for its fsync:
    /// it is in the file, in chain order, at once (so a broker crash loses
    /// none of it, only a host crash can), and durable with the next line
    /// that waits, or within a second (`settle_lazy`, from the server's
    /// once-a-second thread). A request that acts still waits for its own
    /// lines: nothing is done or acknowledged before its record is durable.
    /// Why: each waited line is an fsync on the request's path, and every
    /// tap-ctl call begins with a hello.
    pub fn audit_lazily(&self, entry: &Entry) -> Result<(), BrokerError> {
        self.append(entry).map(|_| ())
    }

    /// Make the lines written without a wait durable, if any are not yet.
    pub fn settle_lazy(&self) {
        if let Some(ticket) = self.commit.behind() {
            if let Err(why) = self.commit.wait(ticket) {
                let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
                self.audit_fails(&mut a, why);
            }
        }
    }

    fn append(&self, entry: &Entry) -> Result<crate::audit_commit::Ticket, BrokerError> {
        let ticket = {
            let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = &a.broken {
                return Err(audit_broken(why));
            }
            let written = a
                .log
                .append_unsynced(entry)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.commit
                        .wrote(|| a.log.sync_handle())
                        .map_err(|e| format!("cannot fsync the audit log: {e}"))
                });
            match written {
                Ok(t) => t,
                Err(why) => return Err(self.audit_fails(&mut a, why)),
            }
        };
        Ok(ticket)
    }

    /// The log failed: refuse this and every later request.
    fn audit_fails(&self, a: &mut crate::broker::AuditState, why: String) -> BrokerError {
        if a.broken.is_none() {
            tracing::error!("{why}; refusing all requests from now on");
            a.broken = Some(why);
        }
        audit_broken(a.broken.as_deref().unwrap_or_default())
    }

    /// Record a decision. Denials go through the [`Denials`] budgets
    /// (strangers' and protocol errors' by kind only): beyond its budget
    /// a denial is counted, and the count is written as one
    /// `denials_suppressed` line per uid per window. Everything else is
    /// written at once, in full.
    fn record(&self, peer: &PeerCred, entry: &Entry) -> Result<(), BrokerError> {
        let Some(class) = Denials::class_of(entry) else {
            return self.audit(entry);
        };
        // Capped once here, so the budget counts the bytes written.
        let entry = Denials::shape(class, entry).bounded();
        // Held while writing, so a window's summary precedes the next
        // window's lines; lock order is denials, then audit.
        let mut l = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for s in l.due(now, false) {
            self.audit_summary(&s)?;
        }
        match l.admit(class, *peer, &entry.rule, entry.line_len(), now) {
            Admit::Full => self.audit(&entry),
            Admit::Counted => self.audit_healthy(),
        }
    }

    /// Write the summaries of ended windows (of every window if `all`).
    /// Called every second, and at shutdown with `all`, so that a uid that
    /// went quiet has its count written too.
    pub fn flush_denials(&self, all: bool) {
        let mut l = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        for s in l.due(Instant::now(), all) {
            let _ = self.audit_summary(&s);
        }
    }

    fn audit_summary(&self, s: &Summary) -> Result<(), BrokerError> {
        let p = &s.last_peer;
        let tenant = s
            .uid
            .and_then(|_| self.policy.tenant_for(p.uid, p.gid))
            .map(|t| t.name.clone());
        self.audit(&s.entry(tenant))
    }

    /// Reopen the audit log after rotation (SIGHUP); see
    /// [`tapjail_common::audit::AuditLog::reopen`]. A failure is reported
    /// and writing goes on in the old file.
    pub fn reopen_audit(&self) -> String {
        let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        // Lines of the old file are made durable before it is left.
        if let Err(why) = self.commit.settle() {
            return format!("cannot reopen the audit log ({why}); still writing the old file");
        }
        match a.log.reopen() {
            Ok(tapjail_common::audit::Reopened::Same) => format!(
                "{} was not rotated; still writing it",
                a.log.path().display()
            ),
            Ok(tapjail_common::audit::Reopened::Rotated { previous }) => format!(
                "audit log reopened: {} continues the chain of {previous}",
                a.log.path().display()
            ),
            Err(e) => format!("cannot reopen the audit log ({e}); still writing the old file"),
        }
    }

    /// Whether the log still works (nothing is written).
    pub fn audit_healthy(&self) -> Result<(), BrokerError> {
        let a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        match &a.broken {
            Some(why) => Err(audit_broken(why)),
            None => Ok(()),
        }
    }

    /// Record something the broker observed (not a decision).
    pub fn notice(
        &self,
        event: Event,
        peer: Option<Peer>,
        tenant: Option<String>,
        rule: &str,
        reason: String,
    ) {
        let _ = self.audit(&notice_line(event, peer, tenant, rule, reason));
    }

    /// A frame that could not be read; the connection is closed after this.
    pub fn audit_frame_error(&self, peer: &PeerCred, err: &FrameError) {
        let _ = self.record(
            peer,
            &Entry {
                event: Event::FrameError,
                peer: Some(peer_of(peer)),
                tenant: self.tenant_of(peer),
                request: None,
                decision: Verdict::Deny,
                rule: "frame".into(),
                reason: err.to_string(),
                outcome: Some("connection closed".into()),
            },
        );
    }

    fn tenant_of(&self, peer: &PeerCred) -> Option<String> {
        self.policy
            .tenant_for(peer.uid, peer.gid)
            .map(|t| t.name.clone())
    }

    /// Refuse a request for a reason outside the policy (protocol misuse).
    pub fn refuse(
        &self,
        peer: &PeerCred,
        req: Option<&Request>,
        rule: &str,
        err: BrokerError,
    ) -> tapjail_common::proto::Reply {
        let entry = Entry {
            event: Event::Request,
            peer: Some(peer_of(peer)),
            tenant: self.tenant_of(peer),
            request: req.and_then(|r| serde_json::to_value(r).ok()),
            decision: Verdict::Deny,
            rule: rule.into(),
            reason: err.message.clone(),
            outcome: None,
        };
        match self.record(peer, &entry) {
            Ok(()) => err.reply(),
            Err(e) => e.reply(),
        }
    }

    /// The decision line of an allowed request, written before acting.
    pub fn audit_decision(
        &self,
        peer: &PeerCred,
        req: &Request,
        d: &Decision,
    ) -> Result<(), BrokerError> {
        let line = request_line(peer, req, d, Verdict::Allow, None, Some(PENDING.into()));
        self.record(peer, &line)
    }

    /// The line that closes a request: a policy denial (its reason is the
    /// whole story), a broker check's refusal, or what was done.
    pub fn audit_outcome(
        &self,
        peer: &PeerCred,
        req: &Request,
        d: &Decision,
        result: &Result<Done, BrokerError>,
    ) -> Result<(), BrokerError> {
        let denied = matches!(result, Err(e) if e.kind == ErrorKind::Denied);
        let verdict = if d.allow && !denied {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        // Policy allowed it but a broker check (openat2) refused.
        let check = match result {
            Err(e) if d.allow && denied => Some(e.message.clone()),
            _ => None,
        };
        let outcome = match result {
            Ok((_, outcome)) => Some(format!("ok: {outcome}")),
            Err(_) if !d.allow => None,
            Err(e) => Some(format!("error ({:?}): {}", e.kind, e.message)),
        };
        let line = request_line(peer, req, d, verdict, check, outcome);
        if !crate::dispatch::changes_state(req) && Denials::class_of(&line).is_none() {
            // A hello, list or stats that was served: nothing to wait for.
            return self.audit_lazily(&line);
        }
        self.record(peer, &line)
    }

    /// One line about a worker's parent request. An allowed locator gets
    /// a decision line (outcome `pending`) before the broker opens
    /// anything, and a line with what came of it.
    pub fn audit_parent(
        &self,
        p: &ParentCtx<'_>,
        locator: Option<&ParentLocator>,
        verdict: Verdict,
        rule: &str,
        reason: String,
        outcome: Option<String>,
    ) -> Result<(), BrokerError> {
        self.audit(&Entry {
            event: Event::ParentOpen,
            peer: Some(Peer {
                pid: p.worker_pid,
                uid: p.worker_uid,
                gid: p.worker_uid,
            }),
            tenant: Some(p.owner.to_string()),
            request: Some(serde_json::json!({
                "minor": p.minor.get(),
                "child": p.child,
                "locator": locator,
            })),
            decision: verdict,
            rule: rule.into(),
            reason,
            outcome,
        })
    }

    /// A worker exited: why, and whether the broker asked it to.
    pub fn audit_worker_exit(&self, x: WorkerExit) {
        let (rule, what) = match (&x.killed, x.stopping) {
            (Some(why), _) => ("worker-killed", format!("was killed by tap-broker ({why})")),
            (None, true) => ("worker-exit", "stopped".to_string()),
            (None, false) => ("worker-death", "died".to_string()),
        };
        let (pid, uid) = (x.pid, x.uid);
        let entry = notice_line(
            Event::WorkerExit,
            Some(Peer { pid, uid, gid: uid }),
            Some(x.owner),
            rule,
            format!(
                "tapdisk {pid}{} {what}: {}",
                x.minor.map(|m| format!(" (minor {m})")).unwrap_or_default(),
                x.exit
            ),
        );
        // A worker that stopped when told to changes nothing the log has
        // not already said (the request that stopped it); a death or a
        // kill is news and waits for its fsync.
        let _ = if x.stopping && x.killed.is_none() {
            self.audit_lazily(&entry)
        } else {
            self.audit(&entry)
        };
    }

    /// A panic inside an operation: the request failed, the minor it held
    /// was given back, the broker serves on.
    pub fn audit_panic(&self, peer: &PeerCred, req: &Request, d: &Decision, what: &str) {
        let outcome = format!("error (Failed): internal error (panic: {what})");
        let _ = self.audit(&request_line(
            peer,
            req,
            d,
            Verdict::Allow,
            None,
            Some(outcome),
        ));
    }
}

/// A line about something the broker observed (not a decision).
fn notice_line(
    event: Event,
    peer: Option<Peer>,
    tenant: Option<String>,
    rule: &str,
    reason: String,
) -> Entry {
    Entry {
        event,
        peer,
        tenant,
        request: None,
        decision: Verdict::Notice,
        rule: rule.into(),
        reason,
        outcome: None,
    }
}

/// A request's line; `check` is the message of a broker check that refused
/// what the policy allowed (rule `broker-check`).
fn request_line(
    peer: &PeerCred,
    req: &Request,
    d: &Decision,
    decision: Verdict,
    check: Option<String>,
    outcome: Option<String>,
) -> Entry {
    let (rule, reason) = match check {
        Some(why) => ("broker-check".to_string(), why),
        None => (d.rule.to_string(), d.reason.clone()),
    };
    Entry {
        event: Event::Request,
        peer: Some(peer_of(peer)),
        tenant: d.tenant.clone(),
        request: serde_json::to_value(req).ok(),
        decision,
        rule,
        reason,
        outcome,
    }
}

fn audit_broken(why: &str) -> BrokerError {
    BrokerError::failed(format!(
        "the audit log cannot be written ({why}); tap-broker refuses requests until it is fixed and restarted"
    ))
}

pub fn peer_of(p: &PeerCred) -> Peer {
    Peer {
        pid: p.pid,
        uid: p.uid,
        gid: p.gid,
    }
}
