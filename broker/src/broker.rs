//! The broker: policy decision, execution and audit of every request, and
//! supervision of the workers.
//!
//! Every request goes `decide` → (execute) → audit (fsync) → reply. The
//! decision and the start of the execution happen under one lock of the
//! table, so ownership cannot change between them. If the audit log cannot
//! be written the broker stops serving (fail closed): it answers every
//! later request with an error rather than act without a record.

use crate::denials::{Admit, Denials, Summary};
use crate::device::factory::DeviceFactory;
use crate::error::BrokerError;
use crate::records::StateDir;
use crate::sys::{self, Exit};
use crate::table::Table;
use crate::worker::SpawnConfig;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tapjail_common::audit::{AuditLog, Entry, Event, Peer, Verdict};
use tapjail_common::frame::FrameError;
use tapjail_common::proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};
use tapjail_common::state::State;
use tapjail_common::Minor;
use tapjail_policy::{decide, Decision, PeerCred, Policy};

#[derive(Debug)]
struct AuditState {
    log: AuditLog,
    /// Why the log is unusable; set once, then every request is refused.
    broken: Option<String>,
}

/// A successful request: what to reply and a short outcome for the audit log.
pub type Done = (Reply, String);

#[derive(Debug)]
pub struct Broker {
    pub policy: Policy,
    audit: Mutex<AuditState>,
    /// Budgets for denials (taken before `audit`).
    denials: Mutex<Denials>,
    table: Mutex<Table>,
    /// Signalled whenever the supervisor records a worker's exit.
    exited: Condvar,
    pub devices: DeviceFactory,
    pub state: StateDir,
    pub spawn_cfg: SpawnConfig,
    /// eventfd that wakes the supervisor when workers are added.
    wake: OwnedFd,
    stopping: AtomicBool,
}

impl Broker {
    pub fn new(
        policy: Policy,
        audit: AuditLog,
        devices: DeviceFactory,
        state: StateDir,
        spawn_cfg: SpawnConfig,
    ) -> std::io::Result<Broker> {
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let window = Duration::from_secs(u64::from(policy.audit_window_secs));
        Ok(Broker {
            policy,
            audit: Mutex::new(AuditState {
                log: audit,
                broken: None,
            }),
            denials: Mutex::new(Denials::new(window)),
            table: Mutex::new(Table::default()),
            exited: Condvar::new(),
            devices,
            state,
            spawn_cfg,
            wake,
            stopping: AtomicBool::new(false),
        })
    }

    /// The table, even if a thread panicked while holding it (the table is
    /// kept consistent between statements, so its content stays usable).
    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append to the audit log; on failure stop serving.
    pub fn audit(&self, entry: &Entry) -> Result<(), BrokerError> {
        let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &a.broken {
            return Err(audit_broken(why));
        }
        match a.log.append(entry) {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = e.to_string();
                eprintln!("tap-broker: {why}; refusing all requests from now on");
                let err = audit_broken(&why);
                a.broken = Some(why);
                Err(err)
            }
        }
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
    /// [`AuditLog::reopen`]. A failure is reported and writing goes on in
    /// the old file.
    pub fn reopen_audit(&self) -> String {
        let mut a = self.audit.lock().unwrap_or_else(|e| e.into_inner());
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

    fn audit_healthy(&self) -> Result<(), BrokerError> {
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
        let _ = self.audit(&Entry {
            event,
            peer,
            tenant,
            request: None,
            decision: Verdict::Notice,
            rule: rule.into(),
            reason,
            outcome: None,
        });
    }

    /// A frame that could not be read; the connection is closed after this.
    pub fn audit_frame_error(&self, peer: &PeerCred, err: &FrameError) {
        let _ = self.record(
            peer,
            &Entry {
                event: Event::FrameError,
                peer: Some(peer_of(peer)),
                tenant: self
                    .policy
                    .tenant_for(peer.uid, peer.gid)
                    .map(|t| t.name.clone()),
                request: None,
                decision: Verdict::Deny,
                rule: "frame".into(),
                reason: err.to_string(),
                outcome: Some("connection closed".into()),
            },
        );
    }

    /// Refuse a request for a reason outside the policy (protocol misuse).
    pub fn refuse(
        &self,
        peer: &PeerCred,
        req: Option<&Request>,
        rule: &str,
        err: BrokerError,
    ) -> Reply {
        let entry = Entry {
            event: Event::Request,
            peer: Some(peer_of(peer)),
            tenant: self
                .policy
                .tenant_for(peer.uid, peer.gid)
                .map(|t| t.name.clone()),
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

    /// Decide, execute, audit, reply.
    pub fn handle(self: &Arc<Self>, peer: &PeerCred, req: &Request) -> Reply {
        if let Err(e) = self.audit_healthy() {
            return e.reply();
        }
        if self.stopping.load(Ordering::SeqCst) {
            return BrokerError::failed("tap-broker is shutting down").reply();
        }
        let t = self.table();
        let d = decide(req, peer, &self.policy, &*t);
        let result = if d.allow {
            self.execute(t, req, &d)
        } else {
            drop(t);
            Err(BrokerError::denied(d.reason.clone()))
        };
        let denied = matches!(&result, Err(e) if e.kind == ErrorKind::Denied);
        let (rule, reason) = if d.allow && denied {
            // Policy allowed it but a broker check (openat2) refused.
            (
                "broker-check".to_string(),
                result
                    .as_ref()
                    .err()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
            )
        } else {
            (d.rule.to_string(), d.reason.clone())
        };
        let entry = Entry {
            event: Event::Request,
            peer: Some(peer_of(peer)),
            tenant: d.tenant.clone(),
            request: serde_json::to_value(req).ok(),
            decision: if d.allow && !denied {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            rule,
            reason,
            outcome: match &result {
                Ok((_, outcome)) => Some(format!("ok: {outcome}")),
                // A policy denial's reason is the whole story.
                Err(_) if !d.allow => None,
                Err(e) => Some(format!("error ({:?}): {}", e.kind, e.message)),
            },
        };
        if let Err(e) = self.record(peer, &entry) {
            return e.reply();
        }
        match result {
            Ok((reply, _)) => reply,
            Err(e) => e.reply(),
        }
    }

    fn execute(
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
                let rows: Vec<_> = t
                    .list(&tenant, d.scope)
                    .into_iter()
                    .filter(|r| pid.is_none_or(|p| r.pid == Some(p)))
                    .filter(|r| minor.is_none_or(|m| r.minor == Some(m)))
                    .collect();
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
        }
    }

    /// Wake the supervisor so it watches newly added workers.
    pub fn wake_supervisor(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Wait until worker `pid` has been reaped, up to `limit`.
    pub fn wait_exit(&self, pid: u32, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut t = self.table();
        loop {
            match t.workers.get(&pid) {
                None => return true,
                Some(w) if w.exit.is_some() => return true,
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            t = self
                .exited
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The supervisor loop: watch every live worker's pidfd; reap and
    /// handle each exit the moment it happens.
    pub fn supervise(self: Arc<Self>) {
        loop {
            let watch: Vec<(u32, Arc<OwnedFd>)> = self
                .table()
                .workers
                .values()
                .filter(|w| w.alive())
                .map(|w| (w.pid, w.pidfd.clone()))
                .collect();
            let mut fds = Vec::with_capacity(watch.len() + 1);
            fds.push(rustix::event::PollFd::new(
                &self.wake,
                rustix::event::PollFlags::IN,
            ));
            for (_, fd) in &watch {
                fds.push(rustix::event::PollFd::new(
                    fd.as_ref(),
                    rustix::event::PollFlags::IN,
                ));
            }
            let timeout = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                continue;
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if ready[0] {
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&self.wake, &mut buf);
            }
            for (i, (pid, fd)) in watch.iter().enumerate() {
                if !ready[i + 1] {
                    continue;
                }
                match sys::try_reap(fd.as_fd()) {
                    Ok(Some(exit)) => self.on_exit(*pid, exit),
                    Ok(None) => {}
                    Err(e) => eprintln!("tap-broker: waitid on tapdisk {pid}: {e}"),
                }
            }
        }
    }

    /// A worker was reaped.
    fn on_exit(self: &Arc<Self>, pid: u32, exit: Exit) {
        let mut t = self.table();
        let Some(w) = t.workers.get_mut(&pid) else {
            return;
        };
        w.exit = Some(exit);
        // Its control socket and stderr pipe need not outlive us any more.
        drop(w.kept.take());
        let (owner, uid, minor, stopping) = (w.owner.clone(), w.uid, w.minor, w.stopping);
        let killed = w.killed.get().cloned();
        if !stopping {
            match minor.and_then(|m| t.disks.get_mut(&m)) {
                Some(d) => {
                    d.state = d.state.with(State::DEAD);
                    d.deaths.push_back(Instant::now());
                    d.persist();
                }
                None => {
                    // Unattached: it held nothing; forget it.
                    if let Some(w) = t.workers.remove(&pid) {
                        w.record.release();
                    }
                }
            }
        }
        self.exited.notify_all();
        drop(t);
        let (rule, what) = match (&killed, stopping) {
            (Some(why), _) => ("worker-killed", format!("was killed by tap-broker ({why})")),
            (None, true) => ("worker-exit", "stopped".to_string()),
            (None, false) => ("worker-death", "died".to_string()),
        };
        self.notice(
            Event::WorkerExit,
            Some(Peer { pid, uid, gid: uid }),
            Some(owner),
            rule,
            format!(
                "tapdisk {pid}{} {what}: {exit}",
                minor.map(|m| format!(" (minor {m})")).unwrap_or_default()
            ),
        );
        if let (false, Some(m)) = (stopping, minor) {
            self.after_op(m);
        }
    }

    /// After an operation on `minor` (or a death): replace a dead worker
    /// that was serving an image, if allowed.
    pub fn after_op(self: &Arc<Self>, minor: Minor) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if !self.policy.respawn {
            // Nobody will serve a dead worker's device again: fail its
            // waiting I/O rather than leave its callers hanging.
            let mut t = self.table();
            if let Some(d) = t.disks.get_mut(&minor) {
                if d.state.contains(State::DEAD) && !d.busy {
                    if let Some(dev) = d.device.as_mut() {
                        let _ = dev.abandon();
                    }
                }
            }
            return;
        }
        let wanted = {
            let t = self.table();
            t.disks.get(&minor).is_some_and(|d| {
                d.state.contains(State::DEAD)
                    && !d.state.contains(State::PAUSED)
                    && d.image.is_some()
                    && d.device.is_some()
                    && !d.busy
            })
        };
        if wanted {
            let me = Arc::clone(self);
            let _ = std::thread::Builder::new()
                .name(format!("respawn-{minor}"))
                .spawn(move || me.respawn(minor));
        }
    }

    /// Refuse new requests and let operations in flight finish (they have
    /// their own deadlines).
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.spawn_cfg.timeout;
        while self.table().disks.values().any(|d| d.busy) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tear everything down (SIGTERM/SIGINT): close images, stop workers,
    /// remove devices, free minors.
    pub fn shutdown(self: &Arc<Self>) {
        self.quiesce();
        let minors: Vec<Minor> = self.table().disks.keys().copied().collect();
        let mut problems = Vec::new();
        for m in &minors {
            if let Err(e) = self.destroy(*m, None) {
                problems.push(format!("minor {m}: {e}"));
            }
        }
        let pids: Vec<u32> = self.table().workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid);
            if let Some(w) = self.table().workers.remove(&pid) {
                w.record.release();
            }
        }
        // Whatever a failed destroy left: its worker is gone now, so take
        // the device down and free the minor regardless.
        let left: Vec<_> = std::mem::take(&mut self.table().disks)
            .into_values()
            .collect();
        for disk in left {
            crate::ops::release_disk(disk);
        }
        // Every denial counted so far is in the log before it ends.
        self.flush_denials(true);
        self.notice(
            Event::BrokerStop,
            None,
            None,
            "shutdown",
            format!(
                "tap-broker stopping: destroyed {} minor(s){}",
                minors.len(),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!("; problems: {}", problems.join("; "))
                }
            ),
        );
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
