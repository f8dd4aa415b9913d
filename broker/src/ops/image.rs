//! open, create, close, destroy: an image served on a device, and the
//! broker's shutdown (destroy of everything).

use super::{closed, drop_served, live_worker, no_image, problems_result, Live};
use crate::audit::Done;
use crate::bringup::{ImageReq, PreOpened, Up};
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::lifecycle::{Phase, Served};
use crate::table::Table;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tapjail_common::audit::Event;
use tapjail_common::proto::{ImageKind, Reply};
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;
use tapjail_policy::Decision;

type Guard<'a> = MutexGuard<'a, Table>;

/// What to open, as the policy granted it.
struct OpenReq<'d> {
    kind: ImageKind,
    d: &'d Decision,
    read_only: bool,
    leaf: Option<&'d PreOpened>,
}

impl Broker {
    pub fn op_open(
        self: &Arc<Self>,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        kind: ImageKind,
        d: &Decision,
        read_only: bool,
    ) -> Result<Done, BrokerError> {
        let w = live_worker(&t, minor, pid)?;
        let lease = Lease::take(&self.table, t, minor, "open", |_, phase| match phase {
            Phase::Attached { .. } => Ok(()),
            p => Err(BrokerError::busy(format!(
                "minor {minor} already has {} open: close it first",
                p.image().map(|i| i.spec.to_string()).unwrap_or_default()
            ))),
        })?;
        let req = OpenReq {
            kind,
            d,
            read_only,
            leaf: None,
        };
        let mut lease = lease;
        let r = self.open_leased(&mut lease, &w, &req);
        drop(lease);
        self.after_op(minor);
        r
    }

    /// Open and serve the image on the leased, attached minor; on success
    /// the lease holds the serving phase.
    fn open_leased(
        self: &Arc<Self>,
        lease: &mut Lease<'_>,
        w: &Live,
        req: &OpenReq<'_>,
    ) -> Result<Done, BrokerError> {
        let minor = lease.minor();
        let grant = req
            .d
            .image
            .clone()
            .ok_or_else(|| BrokerError::failed("policy allowed open without an image grant"))?;
        let owner = self.table().disk(minor)?.owner.clone();
        let ir = ImageReq {
            kind: req.kind,
            grant: &grant,
            read_only: req.read_only || grant.read_only,
            unpause: false,
            leaf: req.leaf,
        };
        let up = self.bring_up_on(w, minor, &owner, ir)?;
        let chain = up.image.chain.join(" <- ");
        let served = self.install(minor, up)?;
        tapjail_broker::phases::lap("publish");
        let link = served.link.display().to_string();
        lease.set(Phase::Serving {
            worker: w.pid,
            served,
        });
        Ok((
            Reply::Ok,
            format!(
                "{}:{} on {link}, chain {chain}",
                req.kind,
                grant.path.display()
            ),
        ))
    }

    /// Publish a freshly served image's device.
    fn install(&self, minor: Minor, up: Up) -> Result<Served, BrokerError> {
        let (Some(mut device), Some(node)) = (up.device, up.node) else {
            return Err(BrokerError::failed("a fresh open made no device"));
        };
        match self.publish(minor, &node) {
            Ok(link) => Ok(Served {
                image: up.image,
                device,
                link,
            }),
            Err(e) => {
                let _ = device.teardown();
                Err(e)
            }
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
        tapjail_broker::phases::lap("allocate");
        // Held from allocation to the served image: nobody else touches
        // the new minor meanwhile.
        let mut lease = Lease::take(&self.table, t, minor, "create", |_, _| Ok(()))?;
        // The leaf is opened (by the tenant's open helper) while the worker
        // starts: neither needs the other, and each is mostly waiting on
        // another process. A failed open is reported once the worker is
        // up, and the worker then stopped with the minor freed.
        let leaf = PreOpened::default();
        let spawned = std::thread::scope(|s| {
            let opening = self.open_leaf_ahead(s, d, minor, read_only);
            let spawned = self.spawn_worker(self.table(), tenant, Some(minor));
            if let Some(h) = opening {
                leaf.set(h.join().ok());
                tapjail_broker::phases::lap("image_open_wait");
            }
            spawned
        });
        let pid = match spawned {
            Ok(p) => p,
            Err(e) => {
                lease.discard();
                return Err(e);
            }
        };
        let w = {
            let mut t = self.table();
            match t.workers.get_mut(&pid) {
                Some(w) => {
                    w.minor = Some(minor);
                    // Its stderr lines name the minor from now on.
                    crate::worker_log::tag(minor, Some(pid));
                    Live::of(w)
                }
                None => {
                    drop(t);
                    lease.discard();
                    return Err(BrokerError::failed(format!("tapdisk {pid} vanished")));
                }
            }
        };
        lease.set(Phase::Attached {
            worker: pid,
            closed: false,
        });
        let req = OpenReq {
            kind,
            d,
            read_only,
            leaf: Some(&leaf),
        };
        let opened = self.open_leased(&mut lease, &w, &req);
        let result = match opened {
            Ok(_) => {
                drop(lease);
                let device = self
                    .table()
                    .disk(minor)
                    .ok()
                    .and_then(|d| d.shown().link)
                    .map(|l| l.display().to_string())
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
                // Undo all of it: the worker stops, the minor is freed.
                let _ = self.detach_and_free(lease);
                Err(e)
            }
        };
        self.after_op(minor);
        result
    }

    /// Start opening `d`'s image on a thread of `scope`, as
    /// [`crate::bringup::Broker::bring_up`] would open it; `None` where the
    /// open must wait for the bring-up (a read cache decides its mode
    /// there) or there is no image.
    fn open_leaf_ahead<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        d: &'s Decision,
        minor: Minor,
        read_only: bool,
    ) -> Option<
        std::thread::ScopedJoinHandle<'s, (bool, Result<crate::image_open::Opened, BrokerError>)>,
    > {
        let grant = d.image.as_ref()?;
        if crate::xapi::scope::plan().read_cache || !open_ahead() {
            return None;
        }
        let writable = !(read_only || grant.read_only);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("leaf-open".into())
            .spawn_scoped(scope, move || {
                let _serving = span.enter();
                (writable, self.open_grant(grant, writable, minor))
            })
            .ok()
    }

    /// Stop the leased minor's worker (if any) and free the minor.
    fn detach_and_free(&self, mut lease: Lease<'_>) -> Result<(), BrokerError> {
        let mut problems = Vec::new();
        let (phase, served) = closed(std::mem::replace(lease.phase_mut(), Phase::Allocated));
        if let Some(s) = served {
            drop_served(s, &mut problems);
        }
        if let Some(wpid) = phase.worker() {
            lease.set(phase);
            self.stop_worker(wpid);
            tapjail_broker::phases::lap("worker_stop");
            self.forget_worker(wpid);
            tapjail_broker::phases::lap("worker_forget");
        }
        lease.discard();
        tapjail_broker::phases::lap("free");
        problems_result(problems)
    }

    pub fn op_close(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
        force: bool,
    ) -> Result<Done, BrokerError> {
        let w = super::Live::of(t.attached(minor, pid)?);
        let lease = Lease::take(&self.table, t, minor, "close", |_, phase| {
            let Some(served) = phase.served() else {
                return Err(no_image(minor));
            };
            if !force && served.device.in_use() {
                return Err(BrokerError::busy(format!(
                    "minor {minor}'s device is in use (mounted?): unmount it first, or use -f"
                )));
            }
            Ok(())
        })?;
        let mut lease = lease;
        self.close(&mut lease, &w, force)?;
        Ok((
            Reply::Ok,
            format!(
                "minor {minor} closed{}",
                if force { " (forced)" } else { "" }
            ),
        ))
    }

    /// Close the leased minor's image: the kernel's data pushed through
    /// the worker, the worker told to close, the device taken down.
    fn close(&self, lease: &mut Lease<'_>, w: &Live, force: bool) -> Result<(), BrokerError> {
        if w.alive && !matches!(lease.phase(), Phase::Dead { .. }) {
            // Push what the kernel still holds through the worker before it
            // closes the image; after this the backend no longer waits on it.
            let synced = lease
                .phase_mut()
                .served_mut()
                .map_or(Ok(()), |s| s.device.sync(true));
            tapjail_broker::phases::lap("loop_flush");
            let r = match synced {
                Err(e) if !force => Err(BrokerError::from(e)),
                _ => w
                    .conn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect(&ToWorker::Close, &[], &FromWorker::Ok)
                    .map_err(BrokerError::from),
            };
            if let Err(e) = r {
                if !force {
                    return Err(e.context("close (use -f to force)"));
                }
                // Forced: the worker's state is unknown; it goes.
                let _ = crate::sys::pidfd_kill(w.pidfd.as_fd());
            }
            tapjail_broker::phases::lap("worker_close");
        }
        let (next, served) = closed(std::mem::replace(lease.phase_mut(), Phase::Allocated));
        lease.set(next);
        self.xapi.forget(lease.minor());
        crate::xapi::cached_parent::unpair(&mut self.table(), lease.minor());
        let mut problems = Vec::new();
        if let Some(s) = served {
            drop_served(s, &mut problems);
        }
        tapjail_broker::phases::lap("device_teardown");
        problems_result(problems)
    }

    /// close -f, detach, free — whatever applies; works on dead workers.
    pub fn destroy(&self, t: Guard<'_>, minor: Minor, pid: Option<u32>) -> Result<(), BrokerError> {
        let worker = match t.disk(minor)?.phase()?.worker() {
            Some(_) => Some(super::Live::of(t.attached(minor, pid)?)),
            None => {
                if let Some(p) = pid {
                    return Err(BrokerError::invalid(format!(
                        "minor {minor} has no tapdisk attached, not {p}"
                    )));
                }
                None
            }
        };
        let mut lease = Lease::take(&self.table, t, minor, "destroy", |_, _| Ok(()))?;
        #[cfg(test)]
        crate::faults::hit("destroy");
        tapjail_broker::phases::lap("lease");
        if let (Some(w), true) = (&worker, lease.phase().served().is_some()) {
            self.close(&mut lease, w, true)?;
        }
        tapjail_broker::phases::lap("close");
        self.detach_and_free(lease)
    }

    pub fn op_destroy(
        &self,
        t: Guard<'_>,
        pid: Option<u32>,
        minor: Minor,
    ) -> Result<Done, BrokerError> {
        self.destroy(t, minor, pid)?;
        Ok((Reply::Ok, format!("minor {minor} destroyed")))
    }

    /// Refuse new requests and let operations in flight finish (they have
    /// their own deadlines).
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.spawn_cfg.timeout;
        while self.table().disks.values().any(|d| d.is_leased()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tear everything down (SIGINT, `--down`): close images, stop workers,
    /// remove devices, free minors.
    pub fn shutdown(self: &Arc<Self>) {
        self.quiesce();
        let minors: Vec<Minor> = self.table().disks.keys().copied().collect();
        let mut problems = Vec::new();
        for m in &minors {
            if let Err(e) = self.destroy(self.table(), *m, None) {
                problems.push(format!("minor {m}: {e}"));
            }
        }
        let pids: Vec<u32> = self.table().workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid);
            self.forget_worker(pid);
        }
        // Whatever a failed destroy left: its worker is gone now, so take
        // the device down and free the minor regardless.
        let left: Vec<_> = std::mem::take(&mut self.table().disks)
            .into_values()
            .collect();
        for disk in left {
            disk.release();
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

/// Set to `off`, create opens the leaf after its worker started, the old
/// way (a baseline for `bench/control-plane.sh`, not a policy key).
pub const OPEN_AHEAD_ENV: &str = "TAPJAIL_OPEN_AHEAD";

fn open_ahead() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var(OPEN_AHEAD_ENV).is_ok_and(|v| v == "off"))
}
