//! The worker supervisor: every worker is started ([`Broker::spawn_worker`],
//! confinement checked in [`process`]), watched ([`Broker::supervise`]),
//! reaped ([`Broker::on_exit`]), stopped ([`Broker::stop_worker`]) and
//! replaced ([`Broker::respawn`]) here, and nowhere else.

mod placement;
pub mod process;
pub mod uids;

use crate::audit::WorkerExit;
use crate::bringup::{DeviceMode, ImageReq, Target};
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::lifecycle::{Phase, Served};
use crate::sys::{self, Exit};
use crate::table::{PendingSpawn, Table, Worker};
use rustix::event::epoll;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tapjail_common::audit::{Event, Peer};
use tapjail_common::worker_proto::ToWorker;
use tapjail_common::Minor;

/// Uids tried per spawn when workers find theirs in use by others.
const MAX_UID_TRIES: usize = 8;

impl Broker {
    /// Spawn a worker for `tenant`. Consumes the guard (spawning is slow).
    pub fn spawn_worker(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        tenant: &str,
        minor: Option<Minor>,
    ) -> Result<u32, BrokerError> {
        let mut t = Some(t);
        let mut tries = 0;
        let (s, uid, cgroup) = loop {
            let (uid, spawned) = self.spawn_with_a_free_uid(t.take(), tenant, minor)?;
            match spawned {
                Err(e) if uids::is_uid_taken(&e) && tries < MAX_UID_TRIES => {
                    tries += 1;
                    tracing::warn!(
                        uid,
                        "worker uid {uid} is in use by a process tapjail did not start; \
                         skipping it for {} s and trying another",
                        uids::SET_ASIDE.as_secs()
                    );
                    self.table().uid_picker.set_aside(uid, Instant::now());
                }
                Err(e) => return Err(e),
                Ok((s, cg)) => break (s, uid, cg),
            }
        };
        let mut t = self.table();
        let record = match self.state.lock_worker(s.pid) {
            Ok(r) => r,
            Err(e) => {
                sys::kill_and_reap(s.pidfd.as_fd());
                return Err(BrokerError::failed(format!("worker record: {e}")));
            }
        };
        let mut w = Worker {
            pid: s.pid,
            owner: tenant.to_string(),
            uid,
            pidfd: s.pidfd,
            killed: s.conn.kill_note(),
            conn: Arc::new(Mutex::new(s.conn)),
            minor: None,
            exit: None,
            stopping: false,
            start_time: s.start_time,
            record,
            kept: s.kept,
            cgroup,
        };
        let rec = w.record();
        // Best effort, like the minors' records.
        let _ = w.record.write(&rec);
        t.workers.insert(s.pid, w);
        drop(t);
        tapjail_broker::phases::lap("worker_record");
        self.wake_supervisor();
        Ok(s.pid)
    }

    /// Pick a uid (constant time: `uids`), hold it as a pending spawn
    /// while the worker starts, and start it.
    #[allow(clippy::type_complexity)]
    fn spawn_with_a_free_uid(
        self: &Arc<Self>,
        t: Option<MutexGuard<'_, Table>>,
        tenant: &str,
        minor: Option<Minor>,
    ) -> Result<
        (
            u32,
            Result<(process::Spawned, Option<Arc<tapjail_broker::cgroup::Leaf>>), BrokerError>,
        ),
        BrokerError,
    > {
        let (lo, hi) = self.policy.worker_uids;
        let mut t = t.unwrap_or_else(|| self.table());
        // A uid is taken only under the lock, from the table as it is then
        // (pending spawns included), so two spawns never pick the same one.
        let taken = t.worker_uids();
        let uid = t
            .uid_picker
            .pick(lo, hi, &taken, Instant::now())
            .ok_or_else(|| {
                BrokerError::busy(format!(
                    "all worker uids {lo}..={hi} are in use: no more tapdisks can run"
                ))
            })?;
        let pending = PendingSpawn {
            owner: tenant.to_string(),
            uid,
        };
        t.pending.push(pending.clone());
        drop(t);
        tapjail_broker::phases::lap("uid_pick");
        let spawned = self.worker_cgroup(tenant, minor, uid).and_then(|cg| {
            tapjail_broker::phases::lap("cgroup");
            let s = process::spawn(&self.spawn_cfg, self.devices.kind(), uid, cg.as_deref())?;
            Ok((s, cg))
        });
        let mut t = self.table();
        if let Some(i) = t.pending.iter().position(|p| *p == pending) {
            t.pending.remove(i);
        }
        Ok((uid, spawned))
    }

    /// Ask a worker to exit; kill it if it does not within the timeout.
    /// Returns once it has been reaped (or after a last grace period).
    pub fn stop_worker(&self, pid: u32) {
        let (conn, pidfd) = {
            let mut t = self.table();
            let Some(w) = t.workers.get_mut(&pid) else {
                return;
            };
            w.stopping = true;
            if !w.alive() {
                return;
            }
            (w.conn.clone(), w.pidfd.clone())
        };
        if let Ok(c) = conn.try_lock() {
            let _ = c.send(&ToWorker::Shutdown, &[]);
        }
        // Watch its pidfd here rather than wait for the supervisor's turn
        // (its wake-up, its reap, then ours on the condvar: 1.8 ms of a
        // destroy at 1000 disks when it polled every pidfd). Whichever
        // of us reaps first records the exit (`record_exit`).
        // One timeout in all before the kill, as when only the supervisor
        // watched: a worker still there after it is not waited for again.
        let ms = i32::try_from(self.spawn_cfg.timeout.as_millis()).unwrap_or(i32::MAX);
        let exited = match sys::pidfd_exited(pidfd.as_fd(), ms) {
            Ok(true) => {
                tapjail_broker::phases::lap("worker_exit");
                if let Ok(Some(exit)) = sys::try_reap(pidfd.as_fd()) {
                    self.record_exit(pid, &pidfd, exit);
                }
                // Reaped by us or the supervisor: recorded either way.
                self.wait_exit(pid, self.spawn_cfg.timeout)
            }
            Ok(false) => false,
            // The pidfd cannot be polled: wait for the supervisor.
            Err(_) => self.wait_exit(pid, self.spawn_cfg.timeout),
        };
        if !exited {
            let _ = sys::pidfd_kill(pidfd.as_fd());
            if !self.wait_exit(pid, Duration::from_secs(5)) {
                tracing::error!(pid, "tapdisk {pid} survives SIGKILL (D state?)");
            }
        }
    }

    /// Forget a worker that has stopped (or is being discarded).
    pub fn forget_worker(&self, pid: u32) {
        if let Some(w) = self.table().workers.remove(&pid) {
            w.record.release();
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
    ///
    /// The pidfds sit in an epoll set, each added once: a `poll` over
    /// every worker's pidfd on every wake-up (each create wakes it) cost
    /// the host about 1.5 ms of CPU per wake-up at 1000 workers, taken
    /// from the creates it raced on two CPUs.
    pub fn supervise(self: Arc<Self>) {
        let epoll = loop {
            match epoll::create(epoll::CreateFlags::CLOEXEC) {
                Ok(e) => break e,
                Err(e) => {
                    tracing::error!("supervisor: epoll_create: {e}; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        if let Err(e) = epoll::add(
            &epoll,
            &self.wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN,
        ) {
            tracing::error!("supervisor: cannot watch its wake-up eventfd: {e}");
        }
        let mut watched = Watched::default();
        let mut events = Vec::with_capacity(64);
        let tick = rustix::event::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            // Workers added since the last turn (a compare per worker in
            // memory, a syscall only per new one).
            let fresh: Vec<(u32, Arc<OwnedFd>)> = self
                .table()
                .workers
                .values()
                .filter(|w| w.alive() && !watched.has(w.pid, &w.pidfd))
                .map(|w| (w.pid, w.pidfd.clone()))
                .collect();
            for (pid, pidfd) in fresh {
                watched.add(&epoll, pid, pidfd);
            }
            events.clear();
            match epoll::wait(
                &epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&tick),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!("supervisor: epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            for ev in &events {
                let id = ev.data.u64();
                if id == WAKE {
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(&self.wake, &mut buf);
                    continue;
                }
                let Some((pid, pidfd)) = watched.get(id) else {
                    continue;
                };
                match sys::try_reap(pidfd.as_fd()) {
                    Ok(Some(exit)) => {
                        watched.remove(&epoll, id);
                        self.on_exit(pid, &pidfd, exit);
                    }
                    // Readable but not exited: nothing to do yet.
                    Ok(None) => {}
                    Err(e) => {
                        // Not ours to reap: watching it would only spin.
                        tracing::warn!(pid, "waitid on tapdisk {pid}: {e}");
                        watched.remove(&epoll, id);
                    }
                }
            }
        }
    }

    /// A worker was reaped. A minor it served becomes `Dead` now, or, if
    /// an operation holds it, when that operation's lease ends.
    fn on_exit(self: &Arc<Self>, pid: u32, pidfd: &Arc<OwnedFd>, exit: Exit) {
        if let Some(m) = self.record_exit(pid, pidfd, exit) {
            self.after_op(m);
        }
    }

    /// Record the exit of worker `pid` (the one behind `pidfd`, not a later
    /// worker that got its pid) once: the supervisor and a stop may both
    /// see it. The minor whose dead worker needs `after_op`, if any.
    fn record_exit(&self, pid: u32, pidfd: &Arc<OwnedFd>, exit: Exit) -> Option<Minor> {
        let mut t = self.table();
        let w = t
            .workers
            .get_mut(&pid)
            .filter(|w| w.exit.is_none() && Arc::ptr_eq(&w.pidfd, pidfd))?;
        w.exit = Some(exit);
        // Its control socket and stderr pipe need not outlive us any more.
        drop(w.kept.take());
        let (owner, uid, minor, stopping) = (w.owner.clone(), w.uid, w.minor, w.stopping);
        let killed = w.killed.get().cloned();
        if !stopping {
            match minor.and_then(|m| t.disks.get_mut(&m)) {
                Some(d) => {
                    d.deaths.push_back(Instant::now());
                    if let Ok(phase) = d.phase_mut() {
                        if phase.worker() == Some(pid) {
                            let p = std::mem::replace(phase, Phase::Allocated);
                            *phase = p.into_dead();
                        }
                    }
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
        let m = minor.map(Minor::get);
        if stopping {
            tracing::debug!(
                pid,
                minor = m,
                tenant = owner.as_str(),
                "tapdisk[{pid}] ended: {exit}"
            );
        } else {
            tracing::warn!(
                pid,
                minor = m,
                tenant = owner.as_str(),
                "tapdisk[{pid}] died: {exit}"
            );
        }
        self.audit_worker_exit(WorkerExit {
            pid,
            uid,
            owner,
            minor,
            killed,
            stopping,
            exit,
        });
        minor.filter(|_| !stopping)
    }

    /// After an operation on `minor` (or a death): replace a dead worker
    /// that was serving an image, if allowed; if not, fail its device's
    /// waiting I/O rather than leave its callers hanging.
    pub fn after_op(self: &Arc<Self>, minor: Minor) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut t = self.table();
        let Some(Ok(phase)) = t.disks.get_mut(&minor).map(|d| d.phase_mut()) else {
            return;
        };
        if !matches!(phase, Phase::Dead { .. }) {
            return;
        }
        if !self.policy.respawn {
            if let Some(s) = phase.served_mut() {
                let _ = s.device.abandon();
            }
            return;
        }
        if !phase.wants_respawn() {
            return;
        }
        drop(t);
        let me = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name(format!("respawn-{minor}"))
            .spawn(move || me.respawn(minor));
    }

    /// Replace the dead worker of `minor` with a fresh one on the same
    /// kernel device (DeviceBackend::recover), reopening the same chain.
    pub fn respawn(self: Arc<Self>, minor: Minor) {
        let mut t = self.table();
        let limit = self.policy.max_restarts_per_minute as usize;
        let Ok(disk) = t.disk_mut(minor) else {
            return;
        };
        let now = Instant::now();
        while disk
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            disk.deaths.pop_front();
        }
        let over_limit = disk.deaths.len() > limit;
        let owner = disk.owner.clone();
        let lease = Lease::take(&self.table, t, minor, "respawn", |_, p| {
            if p.wants_respawn() {
                Ok(())
            } else {
                Err(BrokerError::busy("nothing to respawn"))
            }
        });
        let Ok(mut lease) = lease else {
            return;
        };
        let old_pid = lease.phase().worker();
        if over_limit {
            let why = format!(
                "{} worker deaths within a minute (limit {limit})",
                limit + 1
            );
            self.leave_dead(lease, owner, "respawn-limit", why);
            return;
        }
        match self.replace_worker(&mut lease, &owner) {
            Ok((pid, uid, next)) => {
                let restarts = {
                    let mut t = self.table();
                    if let Some(old) = old_pid.and_then(|p| t.workers.remove(&p)) {
                        old.record.release();
                    }
                    if let Some(w) = t.workers.get_mut(&pid) {
                        w.minor = Some(minor);
                    }
                    t.disk_mut(minor).map(|d| {
                        d.restarts += 1;
                        d.restarts
                    })
                };
                lease.commit(next);
                self.notice(
                    Event::WorkerRespawn,
                    Some(Peer { pid, uid, gid: uid }),
                    Some(owner),
                    "respawn",
                    format!(
                        "minor {minor}: dead tapdisk {} replaced by tapdisk {pid} (restart {})",
                        old_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                        restarts.unwrap_or(0)
                    ),
                );
                // A replacement that died already is replaced in turn
                // (within the respawn limit).
                self.after_op(minor);
            }
            Err(e) => {
                let why = format!("could not replace its dead tapdisk: {e}");
                self.leave_dead(lease, owner, "respawn-failed", why);
            }
        }
    }

    /// No worker will serve the leased dead minor again: fail the I/O
    /// waiting on its device, and say so.
    fn leave_dead(&self, mut lease: Lease<'_>, owner: String, rule: &str, why: String) {
        let minor = lease.minor();
        let abandoned = lease.phase_mut().served_mut().map(|s| s.device.abandon());
        drop(lease);
        let note = match abandoned.unwrap_or(Ok(())) {
            Ok(()) => "; its pending I/O fails".to_string(),
            Err(e) => format!("; failing its pending I/O failed too: {e}"),
        };
        self.notice(
            Event::WorkerRespawn,
            None,
            Some(owner),
            rule,
            format!("minor {minor}: {why}; left DEAD{note}"),
        );
    }

    /// Start a worker and have it serve the leased dead minor's image on
    /// its existing device. Returns the phase to commit.
    fn replace_worker(
        self: &Arc<Self>,
        lease: &mut Lease<'_>,
        owner: &str,
    ) -> Result<(u32, u32, Phase), BrokerError> {
        let minor = lease.minor();
        let pid = self.spawn_worker(self.table(), owner, Some(minor))?;
        // Tag its log lines from the first one: it reopens the image
        // before the lease settles (which tags on persist).
        crate::worker_log::tag(minor, Some(pid));
        let (uid, conn) = {
            let t = self.table();
            let w = t.worker(pid)?;
            (w.uid, w.conn.clone())
        };
        let target = Target {
            minor,
            owner,
            worker_pid: pid,
            worker_uid: uid,
        };
        let Some(served) = lease.phase_mut().served_mut() else {
            return Err(BrokerError::failed("nothing to respawn"));
        };
        let image = served.image.clone();
        let up = {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let req = ImageReq {
                kind: image.spec.kind,
                grant: &image.grant,
                read_only: image.read_only,
                unpause: false,
                leaf: None,
            };
            self.bring_up(&target, &conn, req, DeviceMode::Recover(&mut served.device))
        };
        match up {
            Ok(up) => {
                let Phase::Dead {
                    served: Some(old), ..
                } = std::mem::replace(lease.phase_mut(), Phase::Allocated)
                else {
                    unreachable!("leased as a dead, served minor");
                };
                let next = Phase::Serving {
                    worker: pid,
                    served: Served {
                        image: up.image,
                        device: old.device,
                        link: old.link,
                    },
                };
                Ok((pid, uid, next))
            }
            Err(e) => {
                self.stop_worker(pid);
                self.forget_worker(pid);
                Err(e)
            }
        }
    }
}

/// The supervisor's epoll key for its wake-up eventfd (worker keys count
/// up from 0).
const WAKE: u64 = u64::MAX;

/// The pidfds in the supervisor's epoll set, each under a key of its own
/// (a pid can come back as another worker's while its old pidfd is still
/// in the set).
#[derive(Default)]
struct Watched {
    by_key: std::collections::HashMap<u64, (u32, Arc<OwnedFd>)>,
    by_pid: std::collections::HashMap<u32, u64>,
    next: u64,
}

impl Watched {
    /// Whether this very worker (`pid` with this `pidfd`) is watched.
    fn has(&self, pid: u32, pidfd: &Arc<OwnedFd>) -> bool {
        self.by_pid
            .get(&pid)
            .and_then(|k| self.by_key.get(k))
            .is_some_and(|(_, fd)| Arc::ptr_eq(fd, pidfd))
    }

    fn add(&mut self, epoll: &OwnedFd, pid: u32, pidfd: Arc<OwnedFd>) {
        let key = self.next;
        self.next += 1;
        match epoll::add(
            epoll,
            pidfd.as_fd(),
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN,
        ) {
            Ok(()) => {
                // An older worker's pidfd under the same pid stays watched
                // under its own key until it reports its exit.
                self.by_pid.insert(pid, key);
                self.by_key.insert(key, (pid, pidfd));
            }
            Err(e) => tracing::error!(pid, "supervisor: cannot watch tapdisk {pid}: {e}"),
        }
    }

    fn get(&self, key: u64) -> Option<(u32, Arc<OwnedFd>)> {
        self.by_key.get(&key).cloned()
    }

    fn remove(&mut self, epoll: &OwnedFd, key: u64) {
        if let Some((pid, fd)) = self.by_key.remove(&key) {
            let _ = epoll::delete(epoll, fd.as_fd());
            if self.by_pid.get(&pid) == Some(&key) {
                self.by_pid.remove(&pid);
            }
        }
    }
}

#[cfg(test)]
mod watched_tests {
    use super::*;

    fn some_fd() -> Arc<OwnedFd> {
        Arc::new(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap())
    }

    /// A pid that comes back as a new worker's while the old worker's
    /// pidfd is still watched: both are watched, each under its own key,
    /// and the old one's exit does not unwatch the new one.
    #[test]
    fn a_reused_pid_is_watched_again_and_the_old_exit_leaves_it_watched() {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let mut w = Watched::default();
        let (old, new) = (some_fd(), some_fd());
        w.add(&ep, 7, old.clone());
        assert!(w.has(7, &old));
        assert!(
            !w.has(7, &new),
            "another pidfd under the same pid is another worker"
        );
        w.add(&ep, 7, new.clone());
        assert!(w.has(7, &new));
        let old_key = w
            .by_key
            .iter()
            .find(|(_, (_, fd))| Arc::ptr_eq(fd, &old))
            .map(|(k, _)| *k)
            .unwrap();
        let (pid, fd) = w.get(old_key).unwrap();
        assert_eq!(pid, 7);
        assert!(Arc::ptr_eq(&fd, &old));
        w.remove(&ep, old_key);
        assert!(
            w.has(7, &new),
            "the old worker's exit unwatched the new one"
        );
        assert_eq!(w.by_key.len(), 1);
    }
}
