//! FUSE + loop: the frontend that works on any kernel with FUSE and loop.
//!
//! ```text
//! prepare   open /dev/fuse, mount it privately (see fuse_mount), keep a
//!           dup of the connection, hand the worker another
//! activate  (worker answered INIT) open the disk file on the mount and
//!           LOOP_CONFIGURE it: 512-byte blocks, direct I/O, autoclear,
//!           read-only for -R  -> /dev/loopN
//! recover   (worker died) the mount and loop stay; hand a fresh worker a
//!           dup with resend = true: it sends FUSE_NOTIFY_RESEND and the
//!           kernel replays what the dead one had read
//! teardown  flush + clear loop, close the file, unmount, close the
//!           connection; with a dead worker abort the connection first so
//!           nothing waits on it
//! ```
//!
//! Every step that touches the mount can block on the worker (it serves the
//! requests). A hostile or wedged worker must not wedge the broker, so such
//! steps run under a deadline; when it passes, the connection is aborted
//! (fusectl), which fails every request and unblocks the step, and if even
//! that is impossible the worker is killed through its pidfd.

use super::factory::DeviceContext;
use super::fuse_mount::FuseMount;
use super::loop_dev::{LoopDevice, LoopSetup};
use super::{DeviceBackend, DeviceError, Handoff, HandoffFds, Prepared};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapjail_common::proto::FrontendKind;

mod abort;
mod handoff;
mod kernel;
mod stale;
#[cfg(test)]
mod tests;

use abort::pidfd_open;
use kernel::kernel_version;
use stale::mount_dir;

pub use kernel::kernel_has_resend;
pub use stale::cleanup_stale;

/// The name of the one file on the mount.
pub const FILE_NAME: &str = "disk";
const FILE_NAME_C: &std::ffi::CStr = c"disk";

/// Whether a fresh worker can take over a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Use FUSE_NOTIFY_RESEND when the kernel has it (Linux >= 6.9).
    Auto,
    /// Never: a dead worker's connection is aborted (its I/O fails with
    /// EIO). For kernels without resend, and to test that path.
    Never,
}

/// Where the private FUSE filesystem is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountAt {
    /// A detached mount reachable only by the broker's fd (Linux >= 5.2).
    Detached,
    /// `mount(2)` on this directory, created 0700; its parent must be a
    /// root-only directory (the broker's state dir).
    Dir(PathBuf),
    /// Detached where the kernel can, else on this directory.
    DetachedOrDir(PathBuf),
}

/// How the broker sets up one FUSE + loop device.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Shown as the loop device's backing file name (`losetup -l`).
    pub name: String,
    pub mount: MountAt,
    pub resend: Resend,
    /// Ask loop for direct I/O (granted where the kernel can).
    pub direct_io: bool,
    /// Longest the broker waits for a step that needs the worker.
    pub timeout: Duration,
}

impl FuseOptions {
    pub fn new(name: impl Into<String>) -> Self {
        FuseOptions {
            name: name.into(),
            mount: MountAt::Detached,
            resend: Resend::Auto,
            direct_io: true,
            timeout: Duration::from_secs(30),
        }
    }
}

/// One minor's FUSE connection, mount and loop device.
#[derive(Debug)]
pub struct FuseBackend {
    opts: FuseOptions,
    read_only: bool,
    size: u64,
    /// The broker's own reference to the connection: keeps the mount
    /// alive across a worker's death.
    conn: Option<OwnedFd>,
    mount: Option<FuseMount>,
    /// The broker's open of the disk file, given to LOOP_CONFIGURE.
    file: Option<File>,
    loop_dev: Option<LoopDevice>,
    /// pidfd of the worker serving the connection, to tell whether it is
    /// alive and to kill it if it wedges teardown.
    worker: Option<OwnedFd>,
    restarts: u32,
    /// The connection was aborted: requests fail, so flushing is moot.
    aborted: bool,
    /// A worker answered INIT (or resent) and has not been reported dead:
    /// between `recover` and `recovered` nobody serves the connection.
    serving: bool,
}

fn io_err(step: impl Into<String>) -> impl FnOnce(io::Error) -> DeviceError {
    move |source| DeviceError::Io {
        step: step.into(),
        source,
    }
}

impl FuseBackend {
    pub fn new(opts: FuseOptions) -> Self {
        FuseBackend {
            opts,
            read_only: false,
            size: 0,
            conn: None,
            mount: None,
            file: None,
            loop_dev: None,
            worker: None,
            restarts: 0,
            aborted: false,
            serving: false,
        }
    }

    /// The backend the broker's factory makes for one minor: named after
    /// the minor in `losetup -l`, mounted detached, or on
    /// `state_dir/fuse/tapdevN` where the kernel predates detached mounts.
    pub fn from_context(ctx: &DeviceContext) -> Result<Self, DeviceError> {
        let mut opts = FuseOptions::new(format!("tapjail:{}", ctx.minor.device_name()));
        opts.mount = MountAt::DetachedOrDir(mount_dir(&ctx.state_dir, ctx.minor));
        Ok(FuseBackend::new(opts))
    }

    /// Why this host cannot use FUSE + loop, if it cannot.
    pub fn probe() -> Result<(), DeviceError> {
        for (node, config) in [
            ("/dev/fuse", "CONFIG_FUSE_FS"),
            ("/dev/loop-control", "CONFIG_BLK_DEV_LOOP"),
        ] {
            if !std::path::Path::new(node).exists() {
                return Err(DeviceError::Unavailable(format!(
                    "fuse: {node} missing ({config})"
                )));
            }
        }
        Ok(())
    }

    /// Whether a fresh worker can replay a dead one's requests here.
    pub fn resend_supported(&self) -> bool {
        self.opts.resend == Resend::Auto && kernel_has_resend()
    }

    /// The loop device, once active.
    pub fn loop_device(&self) -> Option<&LoopDevice> {
        self.loop_dev.as_ref()
    }

    /// fusectl's name for the connection, while mounted.
    pub fn connection(&self) -> Option<u32> {
        self.mount.as_ref().map(FuseMount::connection)
    }

    /// Workers that took over this connection after a death.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    fn open_file(&mut self) -> Result<File, DeviceError> {
        let root = self
            .mount
            .as_ref()
            .and_then(FuseMount::root)
            .ok_or_else(|| DeviceError::Failed("fuse: not mounted".into()))?
            .as_raw_fd();
        let flags = if self.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        } | libc::O_CLOEXEC
            | libc::O_NOFOLLOW;
        let (file, late) = self.deadline().run("open the disk file", move || {
            // SAFETY: root is the O_PATH fd self.mount owns for the whole
            // call (self is borrowed); the path is a live C string.
            let fd = unsafe { libc::openat(root, FILE_NAME_C.as_ptr(), flags) };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: a fresh fd we own.
                Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
            }
        });
        match (file, late) {
            (Ok(f), None) => Ok(f),
            (_, Some(late)) => Err(late),
            (Err(e), None) => Err(io_err("fuse: open the disk file on the mount")(e)),
        }
    }
}

impl DeviceBackend for FuseBackend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::Fuse
    }

    fn prepare(&mut self, size: u64, read_only: bool) -> Result<Prepared, DeviceError> {
        if self.conn.is_some() || self.mount.is_some() {
            return Err(DeviceError::Failed("fuse: already prepared".into()));
        }
        Self::probe()?;
        let conn = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map(OwnedFd::from)
            .map_err(io_err("fuse: open /dev/fuse"))?;
        let mount = match &self.opts.mount {
            MountAt::Detached => FuseMount::detached(conn.as_fd()),
            MountAt::Dir(dir) => FuseMount::mount_on(conn.as_fd(), dir),
            MountAt::DetachedOrDir(dir) => {
                FuseMount::detached(conn.as_fd()).or_else(|e| match e.errno() {
                    Some(libc::ENOSYS) => FuseMount::mount_on(conn.as_fd(), dir),
                    _ => Err(e),
                })
            }
        }
        .map_err(|e| DeviceError::Failed(e.to_string()))?;
        self.size = size;
        self.read_only = read_only;
        self.conn = Some(conn);
        self.mount = Some(mount);
        self.handoff(false)
    }

    fn activate(&mut self, worker_pid: u32) -> Result<PathBuf, DeviceError> {
        if let Some(dev) = &self.loop_dev {
            return Ok(dev.path().to_path_buf());
        }
        self.worker = pidfd_open(worker_pid);
        self.serving = true;
        let file = self.open_file()?;
        crate::phases::lap("fuse_open");
        let len = file
            .metadata()
            .map_err(io_err("fuse: stat disk file"))?
            .len();
        if len != self.size {
            return Err(DeviceError::Failed(format!(
                "fuse: worker serves {len} bytes, expected {}",
                self.size
            )));
        }
        let setup = LoopSetup {
            read_only: self.read_only,
            direct_io: self.opts.direct_io,
            block_size: 512,
            name: self.opts.name.clone(),
        };
        let backing = file.as_raw_fd();
        // LOOP_CONFIGURE stats the file and asks for STATFS (discard
        // granularity): it needs the worker too.
        let (attached, late) = self.deadline().run("configure the loop device", move || {
            // SAFETY: `file` is owned by this function's frame and outlives
            // the scoped thread that borrows its fd here.
            LoopDevice::attach(unsafe { BorrowedFd::borrow_raw(backing) }, &setup)
        });
        self.file = Some(file);
        let dev = match (attached, late) {
            (Ok(dev), None) => dev,
            (Ok(mut dev), Some(late)) => {
                let _ = dev.detach();
                return Err(late);
            }
            (Err(e), _) => return Err(DeviceError::Failed(e.to_string())),
        };
        crate::phases::lap("loop_configure");
        let path = dev.path().to_path_buf();
        self.loop_dev = Some(dev);
        Ok(path)
    }

    fn recover(&mut self) -> Result<Prepared, DeviceError> {
        if !self.resend_supported() {
            let why = if self.opts.resend == Resend::Never {
                "fuse: recovery disabled".to_string()
            } else {
                format!(
                    "fuse: kernel {} lacks FUSE_NOTIFY_RESEND (Linux >= 6.9); the dead worker's requests cannot be replayed",
                    kernel_version().map_or("?".into(), |(a, b)| format!("{a}.{b}"))
                )
            };
            // Fail what the dead worker held rather than leave it hanging.
            let _ = self.abort();
            return Err(DeviceError::Unavailable(why));
        }
        drop(self.worker.take());
        self.serving = false;
        self.handoff(true)
    }

    fn recovered(&mut self, worker_pid: u32) -> Result<(), DeviceError> {
        self.worker = pidfd_open(worker_pid);
        self.serving = true;
        self.restarts = self.restarts.saturating_add(1);
        Ok(())
    }

    fn sync(&mut self, closing: bool) -> Result<(), DeviceError> {
        let mut result = Ok(());
        if let (Some(dev), true, false) = (&self.loop_dev, self.serving, self.aborted) {
            let (r, late) = self.deadline().run("flush the loop device", || dev.flush());
            result = match (r, late) {
                (_, Some(late)) => {
                    // The deadline aborted the connection: nothing is
                    // served any more, so teardown must not flush again.
                    self.aborted = true;
                    Err(late)
                }
                (Err(e), None) => Err(DeviceError::Failed(e.to_string())),
                (Ok(()), None) => Ok(()),
            };
        }
        if closing {
            self.serving = false;
        }
        result
    }

    fn in_use(&self) -> bool {
        self.loop_dev.as_ref().is_some_and(LoopDevice::in_use)
    }

    fn handoff(&self) -> Option<HandoffFds<'_>> {
        let conn = self.conn.as_ref()?.as_fd();
        let mount = self.mount.as_ref()?;
        let file = self.file.as_ref()?.as_fd();
        let dev = self.loop_dev.as_ref()?;
        let fds = vec![
            ("fuse", conn),
            ("mount", mount.root()?),
            ("file", file),
            ("loop", dev.fd()?),
        ];
        Some((
            Handoff {
                kind: "fuse".into(),
                size: self.size,
                read_only: self.read_only,
                restarts: self.restarts,
                node: dev.path().to_path_buf(),
                loop_number: Some(dev.number()),
                mount_dir: mount.dir().map(Path::to_path_buf),
                ublk_dev_id: None,
                nbd_connections: None,
                roles: fds.iter().map(|(r, _)| r.to_string()).collect(),
            },
            fds,
        ))
    }

    fn adopted(&mut self, worker_pid: Option<u32>) {
        self.worker = worker_pid.and_then(pidfd_open);
        self.serving = self.worker.is_some();
    }

    fn abandon(&mut self) -> Result<(), DeviceError> {
        self.serving = false;
        if self.aborted {
            return Ok(());
        }
        self.abort()
    }

    fn teardown(&mut self) -> Result<(), DeviceError> {
        let mut first: Option<DeviceError> = None;
        let mut note = |r: Result<(), DeviceError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        // Nobody will answer a dead worker's requests (or, between recover
        // and recovered, anyone's): fail them first so the flush and clear
        // below cannot wait on them.
        let unserved = !self.serving || self.worker_exited() == Some(true);
        if unserved && self.loop_dev.is_some() && self.conn.is_some() {
            note(self.abort());
        }
        crate::phases::lap("td_abort");
        if let Some(mut dev) = self.loop_dev.take() {
            let file = self.file.take();
            let flush = !self.aborted;
            let (r, late) = self
                .deadline()
                .run("flush and clear the loop device", move || {
                    // After an abort every request fails: what the page cache
                    // still held is lost with the worker, and saying so again
                    // as a teardown error would only hide that teardown worked.
                    let flushed = if flush { dev.flush() } else { Ok(()) };
                    let cleared = dev.detach();
                    drop(dev);
                    drop(file);
                    flushed.and(cleared)
                });
            note(r.map_err(|e| DeviceError::Failed(e.to_string())));
            if let Some(late) = late {
                note(Err(late));
            }
        }
        crate::phases::lap("td_loop_clear");
        if let Some(file) = self.file.take() {
            let (_, late) = self
                .deadline()
                .run("close the disk file", move || drop(file));
            if let Some(late) = late {
                note(Err(late));
            }
        }
        crate::phases::lap("td_file_close");
        if let Some(mut mount) = self.mount.take() {
            let (r, late) = self.deadline().run("unmount", move || mount.unmount());
            note(r.map_err(|e| DeviceError::Failed(e.to_string())));
            if let Some(late) = late {
                note(Err(late));
            }
        }
        crate::phases::lap("td_unmount");
        drop(self.conn.take());
        drop(self.worker.take());
        crate::phases::lap("td_conn_close");
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for FuseBackend {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
