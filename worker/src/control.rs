//! Broker mode: the request loop on the control socket (fd 3).
//!
//! The worker is already confined when this runs. It announces itself with
//! [`FromWorker::Ready`], then answers each [`ToWorker`] with exactly one
//! [`FromWorker`]; while opening a differencing chain it asks for parents
//! with [`FromWorker::NeedParent`] and waits for [`ToWorker::Parent`]
//! (see [`BrokerParents`]). The frontend runs on its own threads; this
//! thread only handles control requests.
//!
//! Everything arrives as fds; the worker never opens a path.

use crate::disk::Disk;
use crate::frontend::fuse::{self, FuseConfig, FuseFrontend};
use crate::frontend::nbd::NbdFrontend;
use crate::frontend::{spawn_thread, Frontend, FrontendError, Stopper};
use crate::image::{self, Backing, Image, ImageError, ParentLocator, ParentOpener};
use crate::io::{CacheMode, UringFile};
use crate::keyring::{DiskState, Keyring};
use crate::mirror::{MirrorSlot, Secondary};
use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use tapjail_common::frame::{self, FrameError, MAX_REQUEST_FRAME};
use tapjail_common::proto::{FrontendKind, ImageKind};
use tapjail_common::worker_proto::{self as wp, FromWorker, FrontendSpec, ToWorker};

/// Parents a chain may have; a longer (or cyclic) chain is refused.
pub const MAX_PARENTS: usize = tapjail_common::worker_proto::MAX_CHAIN_DEPTH;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket: {0}")]
    Frame(#[from] FrameError),
}

/// Asks the broker for parent images over the control socket.
#[derive(Debug)]
pub struct BrokerParents<'a> {
    sock: BorrowedFd<'a>,
    cache: CacheMode,
    asked: usize,
    /// Set when a new broker's `Resync` arrived instead of a `Parent`.
    resync: Option<&'a Cell<Option<[u8; 16]>>>,
}

impl<'a> BrokerParents<'a> {
    pub fn new(sock: BorrowedFd<'a>, cache: CacheMode) -> Self {
        BrokerParents {
            sock,
            cache,
            asked: 0,
            resync: None,
        }
    }

    /// Note a `Resync` that interrupts the exchange in `slot` (the
    /// control loop answers it once the open has failed).
    pub fn on_resync(mut self, slot: &'a Cell<Option<[u8; 16]>>) -> Self {
        self.resync = Some(slot);
        self
    }
}

impl ParentOpener for BrokerParents<'_> {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        self.asked += 1;
        if self.asked > MAX_PARENTS {
            return Err(ImageError::Parent(format!(
                "chain longer than {MAX_PARENTS} images"
            )));
        }
        let msg = FromWorker::NeedParent {
            child: child.to_string(),
            locators: locators
                .iter()
                .map(|l| wp::ParentLocator {
                    code: l.code.clone(),
                    path: l.path.clone(),
                    relative: l.relative,
                })
                .collect(),
            parent_uuid,
        };
        let lost = |e: FrameError| ImageError::Parent(format!("asking the broker: {e}"));
        frame::send(self.sock, &msg, &[]).map_err(lost)?;
        let (reply, mut fds): (ToWorker, _) =
            frame::recv(self.sock, MAX_REQUEST_FRAME).map_err(lost)?;
        match (reply, fds.len()) {
            (ToWorker::Parent(Ok(name)), 1) => {
                let fd = fds.remove(0);
                let file = UringFile::new(fd, self.cache).map_err(|source| ImageError::Io {
                    op: "setting up parent file",
                    offset: 0,
                    source,
                })?;
                Ok((Box::new(file), name))
            }
            (ToWorker::Parent(Err(why)), _) => Err(ImageError::Parent(why)),
            (ToWorker::Resync { nonce }, 0) if self.resync.is_some() => {
                if let Some(slot) = self.resync {
                    slot.set(Some(nonce));
                }
                Err(ImageError::Parent(
                    "the broker restarted while this image was being opened".into(),
                ))
            }
            (other, n) => Err(ImageError::Parent(format!(
                "broker answered NeedParent with {other:?} and {n} fds"
            ))),
        }
    }
}

/// Open an image chain from a leaf fd.
pub fn open_image(
    kind: ImageKind,
    leaf: OwnedFd,
    name: &str,
    read_only: bool,
    cache: CacheMode,
    parents: &mut dyn ParentOpener,
    key: Option<&tapjail_common::secret::Secret>,
) -> Result<Arc<dyn Image>, ImageError> {
    let file = UringFile::new(leaf, cache).map_err(|source| ImageError::Io {
        op: "setting up image file",
        offset: 0,
        source,
    })?;
    image::open_chain_keyed(kind, Box::new(file), name, read_only, parents, key)
}

fn opened(img: &dyn Image) -> FromWorker {
    FromWorker::Opened {
        virtual_size: img.virtual_size(),
        chain: img.stats().into_iter().map(|l| l.name).collect(),
    }
}

/// A frontend serving on its own thread.
struct Running {
    kind: &'static str,
    stop: Option<Stopper>,
    thread: JoinHandle<Result<(), FrontendError>>,
}

impl Running {
    fn stop(self) {
        if let Some(stop) = self.stop {
            stop();
        }
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(frontend = %self.kind, "{} frontend: {e}", self.kind),
            Err(_) => {
                tracing::error!(frontend = %self.kind, "{} frontend thread panicked", self.kind)
            }
        }
    }
}

/// The open disk and what serves it.
pub(crate) struct Open {
    pub(crate) disk: Arc<Disk>,
    /// `TYPE:PATH` of the leaf, for stats.
    pub(crate) name: String,
    pub(crate) paused: bool,
    frontend: Option<Running>,
    /// An online snapshot between its two steps.
    prepared: Option<crate::snapshot::Prepared>,
    snapshots: tapjail_common::snapshot::SnapshotStats,
}

/// The worker's state between control requests.
pub struct Worker {
    pub(crate) sock: OwnedFd,
    frontend_kind: FrontendKind,
    /// `--cache`: what `Close` returns `cache` and `parent_cache` to.
    base_cache: CacheMode,
    pub(crate) cache: CacheMode,
    pub(crate) parent_cache: CacheMode,
    /// `open -E` / `unpause -E` keys (`ToWorker::Key`): see [`Keyring`].
    key: Keyring,
    pub(crate) open: Option<Open>,
    /// A `Resync` that arrived in the middle of an exchange.
    pub(crate) resync: Cell<Option<[u8; 16]>>,
    /// I/O limits; every disk this worker opens passes through them.
    throttle: Arc<crate::qos::Throttle>,
    /// Changed-block bitmaps; every image this worker serves is wrapped
    /// in [`crate::cbt::Tracked`] with it, so they outlive pause/unpause.
    pub(crate) cbt: Arc<crate::cbt::Tracker>,
    /// Mirroring: see [`crate::mirror`] and [`MirrorSlot`].
    pub(crate) mirror: MirrorSlot,
    /// `open -r`: see [`crate::read_cache`].
    read_cache: crate::read_cache::ReadCache,
    /// The running (or last) online coalesce: see [`crate::coalesce`].
    pub(crate) coalesce: Option<crate::coalesce::Job>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("frontend_kind", &self.frontend_kind)
            .field("open", &self.open.as_ref().map(|o| &o.name))
            .finish()
    }
}

fn error(msg: impl std::fmt::Display) -> FromWorker {
    FromWorker::Error(msg.to_string())
}

impl Worker {
    /// `frontend_kind` is what the seccomp filter was built for; a `Serve`
    /// for another frontend is refused.
    pub fn new(sock: OwnedFd, frontend_kind: FrontendKind, cache: CacheMode) -> Worker {
        Worker {
            sock,
            frontend_kind,
            base_cache: cache,
            cache,
            parent_cache: cache,
            key: Keyring::default(),
            open: None,
            resync: Cell::new(None),
            throttle: Arc::default(),
            cbt: Arc::default(),
            mirror: MirrorSlot::default(),
            read_cache: Default::default(),
            coalesce: None,
        }
    }

    /// The answer to `Resync`: what this worker has now.
    fn resynced(&self, nonce: [u8; 16]) -> FromWorker {
        FromWorker::Resynced {
            nonce,
            image: self.open.as_ref().map(|o| o.name.clone()),
            serving: self.open.as_ref().is_some_and(|o| o.frontend.is_some()),
            paused: self.open.as_ref().is_some_and(|o| o.paused),
        }
    }

    /// Announce readiness, then serve requests until `Shutdown` or until
    /// the broker goes away; the image is flushed and closed either way.
    pub fn run(mut self) -> Result<(), ControlError> {
        frame::send(
            self.sock.as_fd(),
            &FromWorker::Ready {
                pid: std::process::id(),
            },
            &[],
        )?;
        loop {
            let (req, fds): (ToWorker, Vec<OwnedFd>) =
                match frame::recv(self.sock.as_fd(), MAX_REQUEST_FRAME) {
                    Ok(m) => m,
                    Err(FrameError::Closed) => {
                        // The broker is gone: flush and close, then exit.
                        if let Err(e) = self.close() {
                            tracing::warn!("closing after the broker left: {e}");
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        if let Err(e) = self.close() {
                            tracing::warn!("closing after a control error: {e}");
                        }
                        return Err(e.into());
                    }
                };
            let shutdown = matches!(req, ToWorker::Shutdown);
            let mut reply = self.handle(req, fds);
            // A new broker took over mid-exchange: whoever asked is gone,
            // so its answer is dropped and the new broker's is sent.
            if let Some(nonce) = self.resync.take() {
                reply = self.resynced(nonce);
            }
            frame::send(self.sock.as_fd(), &reply, &[])?;
            if shutdown {
                return Ok(());
            }
        }
    }

    fn handle(&mut self, req: ToWorker, mut fds: Vec<OwnedFd>) -> FromWorker {
        if let Some(why) = self.coalesce_refuses(&req) {
            return error(why);
        }
        match req {
            ToWorker::Open {
                kind,
                name,
                read_only,
            } => {
                if self.open.is_some() {
                    return error("an image is open already; Close it first");
                }
                let Some(leaf) = single_fd(&mut fds) else {
                    return error("Open needs exactly one fd (the leaf image)");
                };
                let mut parents = BrokerParents::new(self.sock.as_fd(), self.parent_cache)
                    .on_resync(&self.resync);
                let opened_img = if self.read_cache.on() {
                    let (cache, key) = (self.cache, self.key.for_open());
                    self.read_cache
                        .open(kind, leaf, &name, cache, &mut parents, key)
                } else {
                    open_image(
                        kind,
                        leaf,
                        &name,
                        read_only,
                        self.cache,
                        &mut parents,
                        self.key.for_open(),
                    )
                }
                .and_then(|img| self.mirror.wrap(img));
                match opened_img {
                    Ok(img) => {
                        let reply = opened(img.as_ref());
                        tracing::info!(
                            image = %name,
                            kind = %kind,
                            virtual_size = img.virtual_size(),
                            "image opened: {kind}:{name}"
                        );
                        let img = crate::cbt::Tracked::wrap(img, self.cbt.clone());
                        let disk = Disk::with_throttle(img, self.throttle.clone());
                        disk.set_cbt(self.cbt.clone());
                        self.open = Some(Open {
                            disk,
                            name: format!("{kind}:{name}"),
                            paused: false,
                            frontend: None,
                            prepared: None,
                            snapshots: Default::default(),
                        });
                        reply
                    }
                    Err(e) => {
                        self.key.clear();
                        error(format!("opening {kind}:{name}: {e}"))
                    }
                }
            }
            ToWorker::Parent(_) => error("Parent without a NeedParent"),
            ToWorker::Serve(spec) => self.serve(spec, fds),
            ToWorker::Pause => match &mut self.open {
                None => error("no image is open"),
                Some(open) => match open.disk.pause() {
                    Ok(()) => {
                        open.paused = true;
                        FromWorker::Ok
                    }
                    Err(e) => error(format!("pause: {e}")),
                },
            },
            ToWorker::Unpause {
                kind,
                name,
                read_only,
            } => self.unpause(kind, name, read_only, fds),
            ToWorker::Close => {
                if self.open.is_none() {
                    return error("no image is open");
                }
                match self.close() {
                    Ok(()) => FromWorker::Ok,
                    Err(e) => error(format!("close: {e}")),
                }
            }
            ToWorker::Stats => {
                let mut stats = match &self.open {
                    None => crate::stats::collect("", None, None),
                    Some(o) => {
                        let mut s = crate::stats::collect(
                            &o.name,
                            Some(&o.disk),
                            o.frontend.as_ref().map(|f| f.kind),
                        );
                        s.snapshot = o.snapshots;
                        s
                    }
                };
                stats.mirror = self.mirror.stats();
                stats.read_cache = self.read_cache.stats().or_else(|| self.mirror.fill_stats());
                stats.coalesce = self.coalesce.as_ref().map(|j| j.stats());
                FromWorker::Stats(Box::new(stats))
            }
            ToWorker::Mirror { uri, standby } => {
                let serving = self.open.as_ref().is_some_and(|o| !o.paused);
                self.mirror
                    .mirror_to(uri, standby, fds, serving, self.cache)
            }
            ToWorker::MirrorSwitch { uri } => {
                let paused = self.open.as_ref().is_some_and(|o| o.paused);
                self.mirror.mirror_switch(&uri, paused)
            }
            ToWorker::SnapshotPrepare { child, parent } => {
                self.snapshot_prepare(&child, &parent, fds)
            }
            ToWorker::SnapshotSwitch => self.snapshot_switch(),
            ToWorker::SnapshotAbort => {
                if let Some(o) = &mut self.open {
                    o.prepared = None;
                }
                FromWorker::Ok
            }
            ToWorker::Resync { nonce } => self.resynced(nonce),
            ToWorker::Coalesce(req) => self.coalesce(req, fds),
            ToWorker::Limits { disk, tenant } => {
                if fds.len() > 1 {
                    return error("Limits takes at most one fd (the tenant bucket)");
                }
                match self.throttle.set(disk, tenant, fds.pop()) {
                    Ok(()) => FromWorker::Throttle(Box::new(self.throttle.stats())),
                    Err(e) => error(format!("limits: {e}")),
                }
            }
            ToWorker::ThrottleStats => FromWorker::Throttle(Box::new(self.throttle.stats())),
            ToWorker::Cache(plan) => {
                if self.open.is_some() {
                    return error("Cache comes before Open, not while an image is open");
                }
                let buffered = |b: bool| {
                    if b {
                        CacheMode::Buffered
                    } else {
                        self.base_cache
                    }
                };
                self.cache = buffered(plan.leaf_buffered);
                self.parent_cache = buffered(plan.leaf_buffered || plan.parents_buffered);
                self.read_cache.set(plan.read_cache);
                self.mirror.leaf_fill = plan.leaf_fill;
                FromWorker::Ok
            }
            ToWorker::Cbt(req) => crate::cbt::control::handle(
                &self.cbt,
                self.open.as_ref().map(|o| o.disk.as_ref()),
                req,
                fds,
            ),
            ToWorker::Key(key) => {
                let state = match &self.open {
                    None => DiskState::Closed,
                    Some(o) if o.paused => DiskState::Paused,
                    Some(_) => DiskState::Serving,
                };
                match self.key.give(key, state) {
                    Ok(()) => FromWorker::Ok,
                    Err(why) => error(why),
                }
            }
            ToWorker::Shutdown => match self.close() {
                Ok(()) => FromWorker::Ok,
                Err(e) => error(format!("shutdown: {e}")),
            },
        }
    }

    /// `Unpause`: reopen, then keep an `unpause -E` key only if that worked.
    fn unpause(
        &mut self,
        kind: ImageKind,
        name: String,
        read_only: bool,
        fds: Vec<OwnedFd>,
    ) -> FromWorker {
        let reply = self.reopen(kind, name, read_only, fds);
        self.key
            .unpaused(matches!(reply, FromWorker::Opened { .. }));
        reply
    }

    fn reopen(
        &mut self,
        kind: ImageKind,
        name: String,
        read_only: bool,
        mut fds: Vec<OwnedFd>,
    ) -> FromWorker {
        let Some(open) = &mut self.open else {
            return error("no image is open");
        };
        if !open.paused {
            return error("the disk is not paused");
        }
        let Some(leaf) = single_fd(&mut fds) else {
            return error("Unpause needs exactly one fd (the leaf image)");
        };
        let mut parents =
            BrokerParents::new(self.sock.as_fd(), self.parent_cache).on_resync(&self.resync);
        let reopened = if self.read_cache.on() {
            let (cache, key) = (self.cache, self.key.for_unpause());
            self.read_cache
                .open(kind, leaf, &name, cache, &mut parents, key)
        } else {
            open_image(
                kind,
                leaf,
                &name,
                read_only,
                self.cache,
                &mut parents,
                self.key.for_unpause(),
            )
        };
        let img = match reopened {
            Ok(img) => img,
            Err(e) => {
                self.mirror.switch = false;
                return error(format!("reopening {kind}:{name}: {e}"));
            }
        };
        let img = if std::mem::take(&mut self.mirror.switch) {
            // Checked in sync by MirrorSwitch; the primary just opened
            // proves the path still opens, and is let go.
            match self.mirror.current.take() {
                Some(m) if m.synced() && m.size() == img.virtual_size() => {
                    Arc::new(Secondary::new(m)) as Arc<dyn Image>
                }
                _ => {
                    return error(
                        "unpause -2: the mirror is no longer in sync; the disk stays paused",
                    )
                }
            }
        } else {
            match self.mirror.wrap(img) {
                Ok(img) => img,
                Err(e) => return error(format!("mirroring {kind}:{name}: {e}")),
            }
        };
        let reply = opened(img.as_ref());
        let img = crate::cbt::Tracked::wrap(img, self.cbt.clone());
        match open.disk.resume(img) {
            Ok(()) => {
                open.paused = false;
                open.name = format!("{kind}:{name}");
                reply
            }
            Err(e) => error(format!("unpause: {e}")),
        }
    }

    fn snapshot_prepare(
        &mut self,
        child: &str,
        parent: &tapjail_common::snapshot::SnapshotParent,
        mut fds: Vec<OwnedFd>,
    ) -> FromWorker {
        let Some(open) = &mut self.open else {
            return error("no image is open");
        };
        if open.paused {
            return error("the disk is paused: unpause it before a snapshot");
        }
        if self.mirror.active() {
            // The switch builds a new chain; the mirror wraps the old one
            // and its background copy reads it. Rather than drop the mirror
            // silently, refuse until mirroring is combined with snapshots.
            return error(
                "the disk mirrors its writes to a secondary (open/unpause -2): an online \
                 snapshot would end the mirror; pause, snapshot offline and unpause -a instead",
            );
        }
        if !open.name.starts_with("vhd:") || open.disk.read_only() {
            return error(format!(
                "{} is not a writable VHD leaf: only a VHD opened read-write can be snapshotted online",
                open.name
            ));
        }
        if fds.len() != 2 {
            return error("SnapshotPrepare needs exactly two fds (the child, the leaf read-only)");
        }
        let leaf = fds.pop();
        let child_fd = fds.pop();
        let (Some(child_fd), Some(leaf)) = (child_fd, leaf) else {
            return error("SnapshotPrepare needs exactly two fds");
        };
        open.prepared = None;
        let mut parents =
            BrokerParents::new(self.sock.as_fd(), self.parent_cache).on_resync(&self.resync);
        match crate::snapshot::prepare(
            child_fd,
            child,
            leaf,
            parent,
            open.disk.size(),
            self.cache,
            self.parent_cache,
            &mut parents,
        ) {
            Ok(p) => {
                open.prepared = Some(p);
                FromWorker::Ok
            }
            Err(e) => error(format!("snapshot: preparing {child}: {e}")),
        }
    }

    fn snapshot_switch(&mut self) -> FromWorker {
        let Some(open) = &mut self.open else {
            return error("no image is open");
        };
        let Some(p) = open.prepared.take() else {
            return error("SnapshotSwitch without a prepared snapshot");
        };
        let child = p.child_name().to_string();
        match crate::snapshot::switch(&open.disk, p, self.cbt.clone()) {
            Ok((chain, stall)) => {
                crate::snapshot::record(&mut open.snapshots, stall);
                open.name = format!("vhd:{child}");
                FromWorker::Snapshotted {
                    chain,
                    stall_us: open.snapshots.last_stall_us,
                }
            }
            Err(e) => error(format!("snapshot: switching to {child}: {e}")),
        }
    }

    fn serve(&mut self, spec: FrontendSpec, mut fds: Vec<OwnedFd>) -> FromWorker {
        let Some(open) = &mut self.open else {
            return error("no image is open");
        };
        if open.frontend.is_some() {
            return error("a frontend is serving already");
        }
        if spec.kind() != self.frontend_kind {
            return error(format!(
                "this worker was confined for the {} frontend, not {}",
                self.frontend_kind.as_str(),
                spec.kind().as_str()
            ));
        }
        let mut frontend: Box<dyn Frontend> = match spec {
            FrontendSpec::Nbd { export_name } => {
                let Some(listener) = single_fd(&mut fds) else {
                    return error("Serve(Nbd) needs exactly one fd (the listening socket)");
                };
                Box::new(NbdFrontend::new(listener, export_name))
            }
            FrontendSpec::Fuse { file_name, resend } => {
                let Some(conn) = single_fd(&mut fds) else {
                    return error("Serve(Fuse) needs exactly one fd (the /dev/fuse connection)");
                };
                let config = FuseConfig {
                    file_name,
                    resend,
                    threads: fuse::DEFAULT_THREADS,
                };
                match FuseFrontend::new(conn, config) {
                    Ok(f) => Box::new(f),
                    Err(e) => return error(format!("fuse frontend: {e}")),
                }
            }
            FrontendSpec::NbdKernel {
                size,
                read_only,
                max_io_bytes,
            } => {
                let export = crate::frontend::nbd::kernel::KernelExport {
                    size,
                    read_only,
                    max_io_bytes,
                };
                match crate::frontend::nbd::KernelNbdFrontend::new(std::mem::take(&mut fds), export)
                {
                    Ok(f) => Box::new(f.exit_when_dropped()),
                    Err(e) => return error(format!("Serve(NbdKernel): {e}")),
                }
            }
            spec @ FrontendSpec::Ublk { .. } => {
                let Some(char_dev) = single_fd(&mut fds) else {
                    return error("Serve(Ublk) needs exactly one fd (/dev/ublkcN)");
                };
                match crate::frontend::ublk::UblkFrontend::new(char_dev, &spec) {
                    Ok(f) => Box::new(f),
                    Err(e) => return error(format!("ublk: {e}")),
                }
            }
        };
        if let Err(e) = frontend.start(&open.disk) {
            return error(format!("starting the {} frontend: {e}", frontend.kind()));
        }
        let kind = frontend.kind();
        let stop = frontend.stopper();
        let disk = open.disk.clone();
        match spawn_thread(&format!("frontend-{kind}"), move || frontend.serve(disk)) {
            Ok(thread) => {
                tracing::info!(frontend = kind, image = %open.name, "serving {} on {kind}", open.name);
                open.frontend = Some(Running { kind, stop, thread });
                FromWorker::Serving
            }
            Err(e) => error(format!("starting the {kind} frontend thread: {e}")),
        }
    }

    /// Stop the frontend, then flush and close the image.
    fn close(&mut self) -> Result<(), crate::disk::DiskError> {
        // The merge lets go of the disk first (its copy steps end).
        self.coalesce = None;
        let Some(mut open) = self.open.take() else {
            self.mirror.clear();
            return Ok(());
        };
        // The next Open states its own cache plan.
        self.cache = self.base_cache;
        self.parent_cache = self.base_cache;
        self.key.clear();
        self.read_cache.clear();
        // Close the disk first so that requests still arriving fail fast
        // instead of waiting for a resume that will not come.
        let closed = open.disk.close();
        if let Some(f) = open.frontend.take() {
            f.stop();
        }
        // Bitmaps belong to the disk; the next Open attaches its own.
        self.cbt.clear();
        self.mirror.clear();
        closed
    }
}

fn single_fd(fds: &mut Vec<OwnedFd>) -> Option<OwnedFd> {
    if fds.len() == 1 {
        fds.pop()
    } else {
        None
    }
}
