//! The lifecycle operations, as blktap's tap-ctl names them.
//!
//! Each takes the table lock held since the policy decision, checks the
//! state (a misuse gets a clear error and changes nothing), marks the disk
//! busy, releases the lock for slow work (the worker, the kernel), and
//! relocks to record the result.

use crate::bringup::{unpublish, DeviceMode, ImageReq, Target};
use crate::broker::{Broker, Done};
use crate::error::BrokerError;
use crate::records::StateDir;
use crate::sys;
use crate::table::{Disk, PendingSpawn, Table, Worker};
use crate::worker::{self, clean};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tapjail_common::audit::{Event, Peer};
use tapjail_common::proto::{ImageKind, Reply, StatsReply};
use tapjail_common::state::State;
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;
use tapjail_policy::Decision;

type Guard<'a> = MutexGuard<'a, Table>;

fn io_err(what: &str) -> impl Fn(std::io::Error) -> BrokerError + '_ {
    move |e| BrokerError::failed(format!("{what}: {e}"))
}

fn dead(pid: u32, minor: Minor) -> BrokerError {
    BrokerError::failed(format!(
        "tapdisk {pid} serving minor {minor} is dead: `tap-ctl destroy -m {minor}` releases it"
    ))
}

impl Broker {
    fn device_path(&self, minor: Minor) -> String {
        self.policy
            .device_dir
            .join(minor.device_name())
            .display()
            .to_string()
    }

    fn clear_busy(&self, minor: Minor) {
        if let Some(d) = self.table().disks.get_mut(&minor) {
            d.busy = false;
        }
    }

    /// Take a free minor (the one asked for, or the lowest in the range
    /// the policy allows) and its lock file.
    fn allocate_minor(
        &self,
        t: &mut Table,
        tenant: &str,
        d: &Decision,
        want: Option<Minor>,
    ) -> Result<Minor, BrokerError> {
        let take = |t: &mut Table, state: &StateDir, m: Minor| -> Result<bool, BrokerError> {
            match state.lock_minor(m).map_err(io_err("minor lock"))? {
                Some(lock) => {
                    let mut disk = Disk::new(m, tenant.to_string(), lock);
                    disk.persist();
                    t.disks.insert(m, disk);
                    Ok(true)
                }
                None => Ok(false),
            }
        };
        if let Some(m) = want {
            if t.disks.contains_key(&m) {
                return Err(BrokerError::busy(format!("minor {m} is already allocated")));
            }
            if !take(t, &self.state, m)? {
                return Err(BrokerError::busy(format!(
                    "minor {m} is held by another tap-broker"
                )));
            }
            return Ok(m);
        }
        let (lo, hi) = d.minors.unwrap_or((0, Minor::COUNT - 1));
        for n in lo..=hi {
            let m = Minor::new(u64::from(n)).map_err(|e| BrokerError::failed(e.to_string()))?;
            if !t.disks.contains_key(&m) && take(t, &self.state, m)? {
                return Ok(m);
            }
        }
        Err(BrokerError::busy(format!("no free minor in {lo}..={hi}")))
    }

    pub fn op_allocate(
        &self,
        mut t: Guard<'_>,
        tenant: &str,
        d: &Decision,
        want: Option<Minor>,
    ) -> Result<Done, BrokerError> {
        let m = self.allocate_minor(&mut t, tenant, d, want)?;
        Ok((
            Reply::Allocated {
                minor: m,
                device: self.device_path(m),
            },
            format!("minor {m}"),
        ))
    }

    pub fn op_free(&self, mut t: Guard<'_>, minor: Minor) -> Result<Done, BrokerError> {
        let disk = t.idle(minor)?;
        if let Some(pid) = disk.worker {
            if t.worker(pid)?.alive() {
                return Err(BrokerError::busy(format!(
                    "minor {minor} is attached to tapdisk {pid}: detach it first (or use destroy)"
                )));
            }
            // A dead worker holds nothing but its entry: free releases it.
            Self::drop_image_locally(&mut t, minor);
            if let Some(w) = t.workers.remove(&pid) {
                w.record.release();
            }
        }
        if let Some(disk) = t.disks.remove(&minor) {
            release_disk(disk);
        }
        Ok((Reply::Ok, format!("minor {minor} freed")))
    }

    /// Spawn a worker for `tenant`. Consumes the guard (spawning is slow).
    fn spawn_worker(self: &Arc<Self>, mut t: Guard<'_>, tenant: &str) -> Result<u32, BrokerError> {
        let (lo, hi) = self.policy.worker_uids;
        let taken = t.worker_uids();
        let on_host = sys::uids_in_use();
        let uid = (lo..=hi)
            .find(|u| !taken.contains(u) && !on_host.contains(u))
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
        let spawned = worker::spawn(&self.spawn_cfg, self.devices.kind(), uid);
        let mut t = self.table();
        if let Some(i) = t.pending.iter().position(|p| *p == pending) {
            t.pending.remove(i);
        }
        let s = spawned?;
        let record = match self.state.lock_worker(s.pid) {
            Ok(r) => r,
            Err(e) => {
                sys::kill_and_reap(s.pidfd.as_fd());
                return Err(BrokerError::failed(format!("worker record: {e}")));
            }
        };
        let w = Worker {
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
        };
        let rec = w.record();
        let w = Worker {
            record: {
                let mut r = w.record;
                let _ = r.write(&rec);
                r
            },
            ..w
        };
        t.workers.insert(s.pid, w);
        drop(t);
        self.wake_supervisor();
        Ok(s.pid)
    }

    pub fn op_spawn(self: &Arc<Self>, t: Guard<'_>, tenant: &str) -> Result<Done, BrokerError> {
        let pid = self.spawn_worker(t, tenant)?;
        Ok((Reply::Spawned { pid }, format!("tapdisk {pid}")))
    }

    pub fn op_attach(&self, mut t: Guard<'_>, pid: u32, minor: Minor) -> Result<Done, BrokerError> {
        let disk = t.idle(minor)?;
        if let Some(other) = disk.worker {
            return Err(BrokerError::busy(format!(
                "minor {minor} is already attached to tapdisk {other}"
            )));
        }
        let w = t.worker(pid)?;
        if !w.alive() {
            return Err(BrokerError::failed(format!("tapdisk {pid} is dead")));
        }
        if let Some(m) = w.minor {
            return Err(BrokerError::busy(format!(
                "tapdisk {pid} is already attached to minor {m}"
            )));
        }
        if let Some(w) = t.workers.get_mut(&pid) {
            w.minor = Some(minor);
        }
        let disk = t.disk_mut(minor)?;
        disk.worker = Some(pid);
        disk.state = State::default();
        disk.persist();
        Ok((
            Reply::Ok,
            format!("tapdisk {pid} attached to minor {minor}"),
        ))
    }

    /// Ask a worker to exit; kill it if it does not within the timeout.
    /// Returns once it has been reaped (or after a last grace period).
    pub fn stop_worker(&self, pid: u32) {
        let conn = {
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
        let (conn, pidfd) = conn;
        if let Ok(c) = conn.try_lock() {
            let _ = c.send(&ToWorker::Shutdown, &[]);
        }
        if !self.wait_exit(pid, self.spawn_cfg.timeout) {
            let _ = sys::pidfd_kill(pidfd.as_fd());
            if !self.wait_exit(pid, Duration::from_secs(5)) {
                eprintln!("tap-broker: tapdisk {pid} survives SIGKILL (D state?)");
            }
        }
    }

    /// Tear down a disk's image and device without the worker (it is dead
    /// or being discarded).
    fn drop_image_locally(t: &mut Table, minor: Minor) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(disk) = t.disks.get_mut(&minor) else {
            return problems;
        };
        if let Some(mut dev) = disk.device.take() {
            if let Err(e) = dev.teardown() {
                problems.push(format!("device: {e}"));
            }
        }
        if let Some(link) = disk.link.take() {
            if let Err(e) = unpublish(&link) {
                problems.push(e.message);
            }
        }
        disk.node = None;
        disk.frontend = None;
        let files = disk.image.take().map(|i| i.files).unwrap_or_default();
        disk.state = disk.state.with(State::CLOSED).without(State::PAUSED);
        disk.persist();
        t.release_files(minor, &files);
        problems
    }

    pub fn op_detach(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        self.detach(t, pid, minor)?;
        Ok((Reply::Ok, format!("minor {minor} detached")))
    }

    fn detach(&self, mut t: Guard<'_>, pid: Option<u32>, minor: Minor) -> Result<u32, BrokerError> {
        let w = t.attached(minor, pid)?;
        let (wpid, alive) = (w.pid, w.alive());
        let disk = t.idle(minor)?;
        if let (true, Some(img)) = (alive, &disk.image) {
            return Err(BrokerError::busy(format!(
                "minor {minor} still has {} open: close it first (or use destroy)",
                img.spec
            )));
        }
        let problems = Self::drop_image_locally(&mut t, minor);
        t.disk_mut(minor)?.busy = true;
        drop(t);
        self.stop_worker(wpid);
        let mut t = self.table();
        if let Some(w) = t.workers.remove(&wpid) {
            w.record.release();
        }
        let disk = t.disk_mut(minor)?;
        disk.worker = None;
        disk.state = State::default();
        disk.busy = false;
        disk.persist();
        if problems.is_empty() {
            Ok(wpid)
        } else {
            Err(BrokerError::failed(problems.join("; ")))
        }
    }

    pub fn op_open(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        kind: ImageKind,
        d: &Decision,
        read_only: bool,
    ) -> Result<Done, BrokerError> {
        let grant = d
            .image
            .clone()
            .ok_or_else(|| BrokerError::failed("policy allowed open without an image grant"))?;
        let w = t.attached(minor, pid)?;
        if !w.alive() {
            return Err(dead(w.pid, minor));
        }
        let (wpid, wuid, conn) = (w.pid, w.uid, w.conn.clone());
        let disk = t.idle(minor)?;
        if let Some(img) = &disk.image {
            return Err(BrokerError::busy(format!(
                "minor {minor} already has {} open: close it first",
                img.spec
            )));
        }
        let owner = disk.owner.clone();
        t.disk_mut(minor)?.busy = true;
        drop(t);
        let target = Target {
            minor,
            owner: &owner,
            worker_pid: wpid,
            worker_uid: wuid,
        };
        let up = {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let req = ImageReq {
                kind,
                grant: &grant,
                read_only: read_only || grant.read_only,
                unpause: false,
            };
            self.bring_up(&target, &conn, req, DeviceMode::Fresh)
        };
        let result = up.and_then(|up| {
            let chain = up.image.chain.join(" <- ");
            self.install(minor, up).map(|link| (link, chain))
        });
        self.clear_busy(minor);
        self.after_op(minor);
        let (link, chain) = result?;
        Ok((
            Reply::Ok,
            format!("{kind}:{} on {link}, chain {chain}", grant.path.display()),
        ))
    }

    /// Record a freshly served image on its disk and publish the device.
    fn install(&self, minor: Minor, up: crate::bringup::Up) -> Result<String, BrokerError> {
        let link = match &up.node {
            Some(node) => Some(self.publish(minor, node)?),
            None => None,
        };
        let mut t = self.table();
        let disk = t.disk_mut(minor)?;
        disk.frontend = up.device.as_ref().map(|d| d.kind());
        disk.device = up.device;
        disk.node = up.node;
        disk.link = link.clone();
        disk.image = Some(up.image);
        disk.state = disk.state.without(State::CLOSED);
        disk.persist();
        Ok(link.map(|l| l.display().to_string()).unwrap_or_default())
    }

    pub fn op_close(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        force: bool,
    ) -> Result<Done, BrokerError> {
        self.close(t, pid, minor, force)?;
        Ok((
            Reply::Ok,
            format!(
                "minor {minor} closed{}",
                if force { " (forced)" } else { "" }
            ),
        ))
    }

    fn close(
        &self,
        mut t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        force: bool,
    ) -> Result<(), BrokerError> {
        let w = t.attached(minor, pid)?;
        let (alive, conn, pidfd) = (w.alive(), w.conn.clone(), w.pidfd.clone());
        let disk = t.idle(minor)?;
        if disk.image.is_none() {
            return Err(BrokerError::busy(format!(
                "minor {minor} has no image open"
            )));
        }
        if !force && disk.device.as_ref().is_some_and(|d| d.in_use()) {
            return Err(BrokerError::busy(format!(
                "minor {minor}'s device is in use (mounted?): unmount it first, or use -f"
            )));
        }
        let disk = t.disk_mut(minor)?;
        disk.busy = true;
        // Out of the table while it flushes (that waits on the worker);
        // `busy` keeps others off the minor meanwhile.
        let mut device = disk.device.take();
        drop(t);
        if alive {
            // Push what the kernel still holds through the worker before it
            // closes the image; after this the backend no longer waits on it.
            let synced = device.as_mut().map_or(Ok(()), |d| d.sync(true));
            let r = match synced {
                Err(e) if !force => Err(BrokerError::from(e)),
                _ => conn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect(&ToWorker::Close, &[], &FromWorker::Ok)
                    .map_err(BrokerError::from),
            };
            if let Err(e) = r {
                if !force {
                    if let Ok(disk) = self.table().disk_mut(minor) {
                        disk.device = device;
                    }
                    self.clear_busy(minor);
                    return Err(e.context("close (use -f to force)"));
                }
                // Forced: the worker's state is unknown; it goes.
                let _ = sys::pidfd_kill(pidfd.as_fd());
            }
        }
        let mut t = self.table();
        let disk = t.disk_mut(minor)?;
        disk.device = device;
        disk.busy = false;
        let problems = Self::drop_image_locally(&mut t, minor);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::failed(problems.join("; ")))
        }
    }

    pub fn op_create(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        tenant: &str,
        d: &Decision,
        kind: ImageKind,
        read_only: bool,
        want: Option<Minor>,
    ) -> Result<Done, BrokerError> {
        let minor = self.allocate_minor(&mut t, tenant, d, want)?;
        let undo_free = |me: &Self| {
            if let Some(disk) = me.table().disks.remove(&minor) {
                release_disk(disk);
            }
        };
        // Keep others off the new minor while the worker starts.
        t.disk_mut(minor)?.busy = true;
        let pid = match self.spawn_worker(t, tenant) {
            Ok(p) => p,
            Err(e) => {
                undo_free(self);
                return Err(e);
            }
        };
        {
            let mut t = self.table();
            if let Some(w) = t.workers.get_mut(&pid) {
                w.minor = Some(minor);
            }
            let disk = t.disk_mut(minor)?;
            disk.worker = Some(pid);
            disk.busy = false;
            disk.persist();
        }
        let t = self.table();
        match self.op_open(t, Some(pid), minor, kind, d, read_only) {
            Ok(_) => {
                let device = self
                    .table()
                    .disks
                    .get(&minor)
                    .and_then(|d| d.link.as_ref().map(|l| l.display().to_string()))
                    .unwrap_or_else(|| self.device_path(minor));
                Ok((
                    Reply::Created {
                        minor,
                        pid,
                        device: device.clone(),
                    },
                    format!("minor {minor}, tapdisk {pid}, {device}"),
                ))
            }
            Err(e) => {
                let _ = self.detach(self.table(), Some(pid), minor);
                undo_free(self);
                Err(e)
            }
        }
    }

    /// close -f, detach, free — whatever applies; works on dead workers.
    pub fn destroy(&self, minor: Minor, pid: Option<u32>) -> Result<(), BrokerError> {
        let t = self.table();
        let disk = t.idle(minor)?;
        let (has_worker, has_image) = (disk.worker.is_some(), disk.image.is_some());
        if has_worker {
            t.attached(minor, pid)?;
        } else if let Some(p) = pid {
            return Err(BrokerError::invalid(format!(
                "minor {minor} has no tapdisk attached, not {p}"
            )));
        }
        if has_image && !has_worker {
            // Adopted with its worker gone: nothing to ask, just take down.
            let mut t = t;
            let problems = Self::drop_image_locally(&mut t, minor);
            if !problems.is_empty() {
                return Err(BrokerError::failed(problems.join("; ")));
            }
        } else if has_image {
            self.close(t, pid, minor, true)?;
        } else {
            drop(t);
        }
        if has_worker {
            self.detach(self.table(), pid, minor)?;
        }
        let mut t = self.table();
        t.idle(minor)?;
        if let Some(disk) = t.disks.remove(&minor) {
            release_disk(disk);
        }
        Ok(())
    }

    pub fn op_destroy(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        drop(t);
        self.destroy(minor, pid)?;
        Ok((Reply::Ok, format!("minor {minor} destroyed")))
    }

    /// Common checks for pause/unpause/stats: a live worker on an idle
    /// disk. Marks the disk busy and returns the connection.
    fn begin_worker_op(
        &self,
        t: &mut Table,
        pid: Option<u32>,
        minor: Minor,
        check: impl FnOnce(&Disk) -> Result<(), BrokerError>,
    ) -> Result<(u32, u32, Arc<Mutex<worker::WorkerConn>>), BrokerError> {
        let w = t.attached(minor, pid)?;
        if !w.alive() {
            return Err(dead(w.pid, minor));
        }
        let (wpid, wuid, conn) = (w.pid, w.uid, w.conn.clone());
        check(t.idle(minor)?)?;
        t.disk_mut(minor)?.busy = true;
        Ok((wpid, wuid, conn))
    }

    pub fn op_pause(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        let (_, _, conn) = self.begin_worker_op(&mut t, pid, minor, |d| {
            if d.image.is_none() {
                return Err(BrokerError::busy(format!(
                    "minor {minor} has no image open"
                )));
            }
            if d.state.contains(State::PAUSED) {
                return Err(BrokerError::busy(format!(
                    "minor {minor} is already paused"
                )));
            }
            Ok(())
        })?;
        // Out of the table while it flushes (that waits on the worker).
        let mut device = t.disk_mut(minor)?.device.take();
        drop(t);
        // What the kernel still holds must be in the image before the
        // worker closes it for the snapshot.
        let synced = device
            .as_mut()
            .map_or(Ok(()), |d| d.sync(false))
            .map_err(BrokerError::from);
        let r = synced.and_then(|()| {
            conn.lock()
                .unwrap_or_else(|e| e.into_inner())
                .expect(&ToWorker::Pause, &[], &FromWorker::Ok)
                .map_err(BrokerError::from)
        });
        let mut t = self.table();
        let disk = t.disk_mut(minor)?;
        disk.device = device;
        disk.busy = false;
        if r.is_ok() {
            disk.state = disk.state.with(State::PAUSED);
            disk.persist();
        }
        drop(t);
        self.after_op(minor);
        r?;
        Ok((Reply::Ok, format!("minor {minor} paused")))
    }

    pub fn op_unpause(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        new_kind: Option<ImageKind>,
        d: &Decision,
    ) -> Result<Done, BrokerError> {
        let (wpid, wuid, conn) = self.begin_worker_op(&mut t, pid, minor, |d| {
            if !d.state.contains(State::PAUSED) {
                return Err(BrokerError::busy(format!("minor {minor} is not paused")));
            }
            Ok(())
        })?;
        let disk = t.disk(minor)?;
        let owner = disk.owner.clone();
        let Some(old) = disk.image.clone() else {
            return Err(BrokerError::failed("paused minor without an image"));
        };
        let (kind, grant) = match (&d.image, new_kind) {
            (Some(g), Some(k)) => (k, g.clone()),
            _ => (old.spec.kind, old.grant.clone()),
        };
        // The paused image's files are released while the new ones are
        // claimed, and given back if the unpause fails.
        t.release_files(minor, &old.files);
        drop(t);
        let target = Target {
            minor,
            owner: &owner,
            worker_pid: wpid,
            worker_uid: wuid,
        };
        let up = {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let req = ImageReq {
                kind,
                grant: &grant,
                read_only: old.read_only,
                unpause: true,
            };
            let up = self.bring_up(&target, &conn, req, DeviceMode::Fresh);
            match up {
                Ok(up) if up.image.size != old.size => {
                    // The worker should have refused; put it back in pause.
                    let _ = conn.call(&ToWorker::Pause, &[]);
                    self.table().release_files(minor, &up.image.files);
                    Err(BrokerError::invalid(format!(
                        "{} has virtual size {} but the paused disk has {}: refused",
                        up.image.spec, up.image.size, old.size
                    )))
                }
                other => other,
            }
        };
        let mut t = self.table();
        let result = match up {
            Ok(up) => {
                let disk = t.disk_mut(minor)?;
                disk.image = Some(up.image);
                disk.state = disk.state.without(State::PAUSED);
                disk.persist();
                Ok(())
            }
            Err(e) => {
                let _ = t.claim_files(minor, &old.files);
                Err(e)
            }
        };
        t.disk_mut(minor)?.busy = false;
        drop(t);
        self.after_op(minor);
        result?;
        Ok((
            Reply::Ok,
            format!("minor {minor} unpaused on {kind}:{}", grant.path.display()),
        ))
    }

    pub fn op_stats(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        let (wpid, _, conn) = self.begin_worker_op(&mut t, pid, minor, |_| Ok(()))?;
        let disk = t.disk(minor)?;
        let (frontend, restarts) = (disk.frontend, disk.restarts);
        drop(t);
        let r = conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .call(&ToWorker::Stats, &[]);
        self.clear_busy(minor);
        self.after_op(minor);
        let mut ws = match r? {
            FromWorker::Stats(ws) => *ws,
            _ => {
                return Err(BrokerError::failed(format!(
                    "tapdisk {wpid} answered Stats with something else"
                )))
            }
        };
        // Worker text is untrusted.
        ws.name = clean(&ws.name);
        ws.frontend.kind = clean(&ws.frontend.kind);
        for img in &mut ws.images {
            img.name = clean(&img.name);
            img.driver.name = clean(&img.driver.name);
            img.driver.status = img.driver.status.as_deref().map(clean);
        }
        Ok((
            Reply::Stats(Box::new(StatsReply {
                minor,
                pid: wpid,
                frontend,
                restarts,
                worker: ws,
            })),
            format!("stats of minor {minor}"),
        ))
    }

    /// Replace the dead worker of `minor` with a fresh one on the same
    /// kernel device (DeviceBackend::recover), reopening the same chain.
    pub fn respawn(self: Arc<Self>, minor: Minor) {
        let mut t = self.table();
        let Some(disk) = t.disks.get_mut(&minor) else {
            return;
        };
        if disk.busy || !disk.state.contains(State::DEAD) || disk.state.contains(State::PAUSED) {
            return;
        }
        let (Some(image), Some(mut device)) = (disk.image.clone(), disk.device.take()) else {
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
        let owner = disk.owner.clone();
        let old_pid = disk.worker;
        if disk.deaths.len() > self.policy.max_restarts_per_minute as usize {
            let abandoned = device.abandon();
            disk.device = Some(device);
            drop(t);
            self.notice(
                Event::WorkerRespawn,
                None,
                Some(owner),
                "respawn-limit",
                format!(
                    "minor {minor}: {} worker deaths within a minute (limit {}); left DEAD{}",
                    self.policy.max_restarts_per_minute + 1,
                    self.policy.max_restarts_per_minute,
                    abandon_note(abandoned),
                ),
            );
            return;
        }
        disk.busy = true;
        // The dead worker's files claims are re-made by the new open.
        t.release_files(minor, &image.files);
        let result = self.replace_worker(t, minor, &owner, &image, &mut device);
        let abandoned = match &result {
            Ok(_) => Ok(()),
            Err(_) => device.abandon(),
        };
        let mut t = self.table();
        let Some(disk) = t.disks.get_mut(&minor) else {
            return;
        };
        disk.device = Some(device);
        disk.busy = false;
        match result {
            Ok((pid, uid, up)) => {
                disk.image = Some(up.image);
                disk.worker = Some(pid);
                disk.state = disk.state.without(State::DEAD);
                disk.restarts += 1;
                disk.persist();
                let restarts = disk.restarts;
                if let Some(old) = old_pid.and_then(|p| t.workers.remove(&p)) {
                    old.record.release();
                }
                if let Some(w) = t.workers.get_mut(&pid) {
                    w.minor = Some(minor);
                }
                drop(t);
                self.notice(
                    Event::WorkerRespawn,
                    Some(Peer { pid, uid, gid: uid }),
                    Some(owner),
                    "respawn",
                    format!(
                        "minor {minor}: dead tapdisk {} replaced by tapdisk {pid} (restart {restarts})",
                        old_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                    ),
                );
            }
            Err(e) => {
                let _ = t.claim_files(minor, &image.files);
                drop(t);
                self.notice(
                    Event::WorkerRespawn,
                    None,
                    Some(owner),
                    "respawn-failed",
                    format!(
                        "minor {minor}: could not replace its dead tapdisk: {e}; left DEAD{}",
                        abandon_note(abandoned)
                    ),
                );
            }
        }
    }

    fn replace_worker(
        self: &Arc<Self>,
        t: Guard<'_>,
        minor: Minor,
        owner: &str,
        image: &crate::table::OpenImage,
        device: &mut Box<dyn crate::device::DeviceBackend>,
    ) -> Result<(u32, u32, crate::bringup::Up), BrokerError> {
        let pid = self.spawn_worker(t, owner)?;
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
        let up = {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let req = ImageReq {
                kind: image.spec.kind,
                grant: &image.grant,
                read_only: image.read_only,
                unpause: false,
            };
            self.bring_up(&target, &conn, req, DeviceMode::Recover(device))
        };
        match up {
            Ok(up) => Ok((pid, uid, up)),
            Err(e) => {
                self.stop_worker(pid);
                if let Some(w) = self.table().workers.remove(&pid) {
                    w.record.release();
                }
                Err(e)
            }
        }
    }
}

/// Remove a disk that has no worker: device symlink, device, lock file.
pub fn release_disk(mut disk: Disk) {
    if let Some(mut dev) = disk.device.take() {
        let _ = dev.teardown();
    }
    if let Some(link) = disk.link.take() {
        let _ = unpublish(&link);
    }
    disk.lock.release();
}

/// What a notice about a disk left DEAD adds about its waiting I/O.
fn abandon_note(r: Result<(), crate::device::DeviceError>) -> String {
    match r {
        Ok(()) => "; its pending I/O fails".into(),
        Err(e) => format!("; failing its pending I/O failed too: {e}"),
    }
}
