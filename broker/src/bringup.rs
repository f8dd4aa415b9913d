//! Bringing an image up on a worker: open the leaf beneath its root, let
//! the worker open the chain (answering its parent requests after a policy
//! check, each audited), then create the kernel side and have the worker
//! serve it. Used by open, create, unpause and respawn.

use crate::audit::{ParentCtx, PENDING};
use crate::broker::Broker;
use crate::device::{DeviceBackend, Prepared};
use crate::error::BrokerError;
use crate::image_open;
use crate::table::{FileId, OpenImage};
use crate::worker::{clean, Opened, ParentRequest, WorkerConn};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tapjail_common::audit::Verdict;
use tapjail_common::proto::{ImageKind, ImageSpec};
use tapjail_common::worker_proto::{FromWorker, ParentLocator, ToWorker};
use tapjail_common::Minor;
use tapjail_policy::{decide_parent, ImageGrant, OpenAs};

/// Who the chain is opened for.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub minor: Minor,
    pub owner: &'a str,
    pub worker_pid: u32,
    pub worker_uid: u32,
}

/// The kernel side to serve: a fresh one, or an existing one being
/// recovered for a fresh worker.
#[derive(Debug)]
pub enum DeviceMode<'a> {
    Fresh,
    Recover(&'a mut Box<dyn DeviceBackend>),
}

/// What to open: TYPE, where, how.
#[derive(Debug, Clone, Copy)]
pub struct ImageReq<'a> {
    pub kind: ImageKind,
    pub grant: &'a ImageGrant,
    pub read_only: bool,
    /// Reopen after pause (`ToWorker::Unpause`; no device work).
    pub unpause: bool,
    /// The leaf, already opened (by `create`, while its worker started);
    /// taken here instead of opening it again.
    pub leaf: Option<&'a PreOpened>,
}

/// A leaf opened ahead of [`Broker::bring_up`]: whether it was opened
/// writable, and what [`Broker::open_grant`] returned for it.
#[derive(Default)]
pub struct PreOpened(std::cell::Cell<Option<(bool, Result<image_open::Opened, BrokerError>)>>);

impl PreOpened {
    pub fn set(&self, opened: Option<(bool, Result<image_open::Opened, BrokerError>)>) {
        self.0.set(opened);
    }

    fn take(&self) -> Option<(bool, Result<image_open::Opened, BrokerError>)> {
        self.0.take()
    }
}

impl std::fmt::Debug for PreOpened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreOpened")
    }
}

/// A new backend and what it published (Fresh mode), or nothing (Recover).
type Served = (Option<Box<dyn DeviceBackend>>, Option<PathBuf>);

/// A served image.
#[derive(Debug)]
pub struct Up {
    pub image: OpenImage,
    /// The new backend (Fresh mode only).
    pub device: Option<Box<dyn DeviceBackend>>,
    /// What the backend published (Fresh mode only).
    pub node: Option<PathBuf>,
}

impl Broker {
    /// Open `grant` for its tenant (her credentials, beneath its root,
    /// locked against other writers, within a deadline): see
    /// [`crate::image_open`].
    pub fn open_grant(
        &self,
        grant: &ImageGrant,
        writable: bool,
        minor: Minor,
    ) -> Result<image_open::Opened, BrokerError> {
        // A file this broker already serves on another minor is refused
        // with the minor that holds it (its lock would refuse it anyway).
        // `minor`'s own claim is no holder: a respawn or unpause reopens
        // what its dead or paused worker held, whose lock may linger a
        // moment in that worker's io_uring after it let go.
        let local = |id: FileId| {
            let t = self.table();
            let (m, other_rw) = t
                .files
                .get(&id)?
                .iter()
                .find(|(m, other_rw)| {
                    *m != minor
                        && (writable || *other_rw)
                        && !crate::xapi::cached_parent::paired(&t, minor, *m, id)
                })
                .copied()?;
            Some(BrokerError::busy(format!(
                "that image file is already open{} on minor {m}",
                if other_rw { " for writing" } else { "" }
            )))
        };
        let opened = image_open::open(grant, writable, self.open_deadline(), &local)?;
        if writable {
            if let Some(why) = self
                .spawn_cfg
                .cgroups
                .memory_image_warning(opened.id.0, &grant.path)
            {
                tracing::warn!(minor = minor.get(), "{why}");
            }
        }
        Ok(opened)
    }

    /// How long one image open may take: the worker's deadline, at most
    /// 10 s (a local open takes microseconds).
    pub(crate) fn open_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.policy.worker_timeout_secs.min(10)))
    }

    /// Open the chain on the worker and serve it on a device.
    ///
    /// On failure nothing is left claimed or created, and the worker is
    /// told to close what it opened.
    pub fn bring_up(
        &self,
        target: &Target<'_>,
        conn: &WorkerConn,
        req: ImageReq<'_>,
        device: DeviceMode<'_>,
    ) -> Result<Up, BrokerError> {
        let ImageReq {
            kind,
            grant,
            read_only,
            unpause,
            leaf,
        } = req;
        // `-r`: the cache file is written by fills, never by the guest:
        // opened writable, served read-only (see `crate::xapi`).
        let fresh = !unpause && matches!(device, DeviceMode::Fresh);
        let read_cache = self.xapi.read_cache(target.minor, fresh);
        if read_cache {
            self.check_read_cache_path(target.owner, &grant.path)?;
        }
        let writable = !read_only || read_cache;
        let opened = match leaf.and_then(PreOpened::take) {
            Some((was_writable, opened)) if was_writable == writable => opened,
            // Opened for another use than this one turned out to need:
            // dropped (closed, unlocked) and opened again.
            _ => self.open_grant(grant, writable, target.minor),
        };
        let image_open::Opened {
            file: leaf,
            id: leaf_id,
        } = opened?;
        tapjail_broker::phases::lap("image_open");
        if !unpause {
            // Before the first request can arrive (a worker keeps its
            // limits across pause and unpause).
            let own = self.table().disk(target.minor)?.io;
            let limits = self.worker_limits(target.owner, own)?;
            self.push_limits(conn, &limits, false)?;
            tapjail_broker::phases::lap("limits");
        }
        let mut files: Vec<(FileId, bool)> = vec![(leaf_id, writable)];
        self.table().claim_files(target.minor, &files)?;
        let name = grant.path.display().to_string();
        let msg = if unpause {
            ToWorker::Unpause {
                kind,
                name: name.clone(),
                read_only,
            }
        } else {
            ToWorker::Open {
                kind,
                name: name.clone(),
                read_only,
            }
        };
        let mut names = vec![grant.path.clone()];
        let cbt_owner = crate::cbt::Owner {
            minor: target.minor,
            tenant: target.owner,
            open_as: &grant.open_as,
        };
        if unpause {
            // `unpause -c LOG`: the paused worker takes the log before any
            // write of the reopened image can arrive.
            if let Err(e) = self.cbt_bring_up(cbt_owner, conn, crate::cbt::When::Unpause) {
                self.table().release_files(target.minor, &files);
                return Err(e);
            }
        }
        if !unpause {
            if let Err(e) = self.xapi.send_plan(conn, target.minor, fresh) {
                self.table().release_files(target.minor, &files);
                return Err(e);
            }
            let mut t = self.table();
            let on_record = self.xapi.cache_record(&t, target.minor);
            if let Ok(d) = t.disk_mut(target.minor) {
                d.cache = on_record;
            }
        }
        let secondary = match self.mirror_hook(conn, target, unpause, &device, &files) {
            Ok(secondary) => {
                files.extend(secondary.map(|id| (id, true)));
                secondary
            }
            Err(e) => {
                self.table().release_files(target.minor, &files);
                return Err(e);
            }
        };
        // `unpause -E`, last before the reopen: nothing below can fail
        // between the key and the Unpause that consumes it.
        let unpause_key = if unpause {
            match self.xapi.send_unpause_key(conn) {
                Ok(k) => k,
                Err(e) => {
                    self.table().release_files(target.minor, &files);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let opened = conn.open_chain(&msg, &leaf, &mut |req| {
            self.resolve_parent(target, &grant.open_as, &mut names, &mut files, req)
        });
        drop(leaf);
        tapjail_broker::phases::lap("worker_open");
        let opened: Opened = match opened {
            Ok(o) => o,
            Err(e) => {
                self.table().release_files(target.minor, &files);
                return Err(e.into());
            }
        };
        if let Err(e) = crate::xapi::secondary::check_not_in_chain(secondary, &files) {
            let _ = conn.call(&ToWorker::Close, &[]);
            self.table().release_files(target.minor, &files);
            return Err(e);
        }
        let image = OpenImage {
            spec: ImageSpec { kind, path: name },
            grant: grant.clone(),
            read_only: read_only || read_cache,
            size: opened.virtual_size,
            chain: opened.chain,
            files: files.clone(),
        };
        if unpause {
            if let Some(key) = unpause_key {
                self.xapi.keep_key(target.minor, key);
            }
            return Ok(Up {
                image,
                device: None,
                node: None,
            });
        }
        let when = match device {
            DeviceMode::Fresh => crate::cbt::When::Open,
            DeviceMode::Recover(_) => crate::cbt::When::Respawn,
        };
        // Every log is tracking before the first write can arrive.
        let served = self
            .cbt_bring_up(cbt_owner, conn, when)
            .and_then(|()| self.serve(target, conn, &image, device));
        match served {
            Ok((device, node)) => Ok(Up {
                image,
                device,
                node,
            }),
            Err(e) => {
                let _ = conn.call(&ToWorker::Close, &[]);
                self.table().release_files(target.minor, &files);
                Err(e)
            }
        }
    }

    /// Give the worker its `-2` mirror (or switch) before the image opens:
    /// see [`crate::mirror::Mirrors::before_open`]. A file secondary is
    /// opened and claimed here; its claim is returned, for the image's.
    fn mirror_hook(
        &self,
        conn: &WorkerConn,
        target: &Target<'_>,
        unpause: bool,
        device: &DeviceMode<'_>,
        held: &[(FileId, bool)],
    ) -> Result<Option<FileId>, BrokerError> {
        use crate::mirror::{Bring, Done};
        let minor = target.minor;
        let bring = match (unpause, device) {
            (true, _) => Bring::Unpause,
            (false, DeviceMode::Fresh) => Bring::Open,
            (false, DeviceMode::Recover(_)) => Bring::Respawn,
        };
        let asked = crate::xapi::scope::mirror();
        let asked = if bring == Bring::Respawn { None } else { asked };
        let claimed = std::cell::Cell::new(None);
        let open_file = |g: &crate::mirror::Granted| {
            let (file, id) = self.open_secondary_file(target.owner, minor, g, held)?;
            claimed.set(Some(id));
            Ok(file)
        };
        let done = self
            .mirrors
            .before_open(conn, minor, bring, asked.as_ref(), &open_file)
            .inspect_err(|_| {
                if let Some(id) = claimed.get() {
                    self.table().release_files(minor, &[(id, true)]);
                }
            })?;
        // Outside a request's own -2 there is no outcome to carry it:
        // on record by itself.
        let event = match (&done, asked.is_some()) {
            (Done::Lost(why), _) => {
                Some(("mirror-lost", format!("mirror not re-established: {why}")))
            }
            (Done::Mirroring(uri), false) => {
                Some(("mirror-reestablished", format!("mirroring to {uri} again")))
            }
            _ => None,
        };
        if let Some((rule, what)) = event {
            self.notice(
                tapjail_common::audit::Event::Mirror,
                None,
                Some(target.owner.to_string()),
                rule,
                format!("minor {minor} (tapdisk {}): {what}", target.worker_pid),
            );
        }
        crate::xapi::scope::set_mirror_done(done);
        let on_record = self.mirrors.file_record(minor);
        if let Ok(d) = self.table().disk_mut(minor) {
            d.secondary = on_record;
        }
        Ok(claimed.get())
    }

    /// Create (or recover) the kernel side and have the worker serve it.
    fn serve(
        &self,
        target: &Target<'_>,
        conn: &WorkerConn,
        image: &OpenImage,
        device: DeviceMode<'_>,
    ) -> Result<Served, BrokerError> {
        match device {
            DeviceMode::Fresh => {
                let mut dev = self.devices.create(target.minor)?;
                tapjail_broker::phases::lap("device_create");
                let result = (|| {
                    let prepared = dev.prepare(image.size, image.read_only)?;
                    tapjail_broker::phases::lap("device_prepare");
                    send_serve(conn, prepared)?;
                    tapjail_broker::phases::lap("worker_serve");
                    let node = dev.activate(target.worker_pid)?;
                    tapjail_broker::phases::lap("device_activate");
                    Ok::<_, BrokerError>(node)
                })();
                match result {
                    Ok(node) => {
                        // The device is live and the request has not
                        // returned yet (a test stops the broker here).
                        crate::stop_point::reached("create-served");
                        self.worker_serving(target.worker_pid);
                        Ok((Some(dev), Some(node)))
                    }
                    Err(e) => {
                        let _ = dev.teardown();
                        Err(e)
                    }
                }
            }
            DeviceMode::Recover(dev) => {
                let prepared = dev.recover()?;
                send_serve(conn, prepared)?;
                dev.recovered(target.worker_pid)?;
                self.worker_serving(target.worker_pid);
                Ok((None, None))
            }
        }
    }

    /// Worker `pid`'s device is live: its cgroup leaves the start-up
    /// weight ([`tapjail_broker::cgroup::leaf::STARTING_CPU_WEIGHT`]).
    /// A failure costs fairness among the tenant's own disks, not the
    /// disk: logged.
    fn worker_serving(&self, pid: u32) {
        let leaf = self.table().worker(pid).ok().and_then(|w| w.cgroup.clone());
        if let Some(leaf) = leaf {
            if let Err(e) = leaf.serving() {
                tracing::warn!("tapdisk {pid}'s cgroup stays at its start-up weight: {e}");
            }
        }
    }

    /// Answer one `NeedParent`: try each locator in order; the first that
    /// the policy allows and that opens cleanly beneath its root wins.
    /// Every attempt is audited, an allowed one before the broker opens
    /// anything: if that line cannot be written the parent is refused.
    pub(crate) fn resolve_parent(
        &self,
        target: &Target<'_>,
        open_as: &OpenAs,
        names: &mut Vec<PathBuf>,
        files: &mut Vec<(FileId, bool)>,
        req: ParentRequest,
    ) -> Result<(String, File), String> {
        let child = PathBuf::from(&req.child);
        let ctx = ParentCtx {
            minor: target.minor,
            owner: target.owner,
            worker_pid: target.worker_pid,
            worker_uid: target.worker_uid,
            child: &req.child,
        };
        // A denial's line is written best effort (nothing is opened).
        let deny = |loc: Option<&ParentLocator>, rule: &str, why: String| {
            let _ = self.audit_parent(&ctx, loc, Verdict::Deny, rule, why, None);
        };
        if !names.contains(&child) {
            let why = format!(
                "the broker never opened {:?} for this worker",
                clean(&req.child)
            );
            deny(None, "unknown-child", why.clone());
            return Err(why);
        }
        let mut reasons = Vec::new();
        for loc in &req.locators {
            let d = decide_parent(
                &self.policy,
                target.owner,
                open_as,
                &child,
                &loc.path,
                loc.relative,
            );
            let Some(grant) = d.image.clone().filter(|_| d.allow) else {
                deny(Some(loc), d.rule, d.reason.clone());
                reasons.push(clean(&d.reason));
                continue;
            };
            let decided = self.audit_parent(
                &ctx,
                Some(loc),
                Verdict::Allow,
                d.rule,
                d.reason.clone(),
                Some(PENDING.into()),
            );
            if let Err(e) = decided {
                return Err(format!("parent refused: {e}"));
            }
            // `-e` on a read cache: its file is read while its worker writes.
            let cache =
                crate::xapi::cached_parent::reader_of(&self.table(), target.minor, names.len());
            let opened = match cache {
                Some((from, cache)) => image_open::open_cache_reader(&grant, self.open_deadline())
                    .and_then(|o| crate::xapi::cached_parent::check(o.id, from, cache).map(|()| o)),
                None => self.open_grant(&grant, false, target.minor),
            }
            .and_then(|opened| {
                let image_open::Opened { file, id } = opened;
                crate::xapi::scope::check_shared_parent(id, names.len())
                    .map_err(BrokerError::denied)?;
                self.table().claim_files(target.minor, &[(id, false)])?;
                Ok((id, file))
            });
            match opened {
                Ok((id, file)) => {
                    files.push((id, false));
                    names.push(grant.path.clone());
                    let done = self.audit_parent(
                        &ctx,
                        Some(loc),
                        Verdict::Allow,
                        d.rule,
                        d.reason.clone(),
                        Some(format!("opened {} read-only", grant.path.display())),
                    );
                    if let Err(e) = done {
                        // The claim goes with the failed open (release_files).
                        return Err(format!("parent refused: {e}"));
                    }
                    return Ok((grant.path.display().to_string(), file));
                }
                Err(e) => {
                    deny(Some(loc), "broker-check", e.message.clone());
                    reasons.push(clean(&e.message));
                }
            }
        }
        if req.locators.is_empty() {
            let why = format!("{} names no parent locator", clean(&req.child));
            deny(None, "no-locator", why.clone());
            return Err(why);
        }
        Err(reasons.join("; "))
    }

    /// Publish `device_dir/tapdevN` → `node`.
    pub fn publish(&self, minor: Minor, node: &Path) -> Result<PathBuf, BrokerError> {
        crate::publish::publish(&self.policy.device_dir, minor, node)
    }
}

fn send_serve(conn: &WorkerConn, prepared: Prepared) -> Result<(), BrokerError> {
    let fds: Vec<_> = prepared.fds.iter().map(|f| f.as_fd()).collect();
    conn.expect(
        &ToWorker::Serve(prepared.spec.clone()),
        &fds,
        &FromWorker::Serving,
    )?;
    Ok(())
}
