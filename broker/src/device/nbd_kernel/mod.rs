//! The kernel nbd frontend: `/dev/nbdN` served by a confined worker over
//! socketpairs the broker connects with netlink (no `nbd-client`).
//!
//! `prepare` makes one socketpair per connection and hands the worker its
//! ends; `activate` gives the kernel ours with NBD_CMD_CONNECT (size,
//! flags, a request timeout, a dead-connection timeout, and a backend
//! identifier that marks the device as this minor's). The kernel holds its
//! own reference to each socket, so the broker keeps nothing open.
//!
//! A dead worker: the kernel notices its sockets closed, holds new I/O for
//! the dead-connection timeout and re-queues what the worker had taken
//! when those requests time out; `recover` makes fresh pairs for the new
//! worker and `recovered` moves the device onto them with
//! NBD_CMD_RECONFIGURE. Closing: `sync` flushes through the worker, the
//! worker is told to stop, then `teardown` disconnects and waits until the
//! kernel let go of the device.

pub mod cmd;
pub mod genl;
mod stale;
pub mod sysfs;

pub use stale::cleanup_stale;
use stale::wait_free;

use super::factory::DeviceContext;
use super::{DeviceBackend, DeviceError, Handoff, HandoffFds, Prepared};
use cmd::{Connect, Driver};
use genl::GenlError;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapjail_common::proto::FrontendKind;
use tapjail_common::worker_proto::FrontendSpec;
use tapjail_common::Minor;

/// Largest READ/WRITE the kernel is allowed to build (queue
/// `max_sectors_kb`); the worker is told to accept that much.
pub const MAX_IO_BYTES: u32 = 512 << 10;
/// Logical block size of the device, as the other frontends.
pub const BLOCK_SIZE: u64 = 512;
/// A request taking longer is re-queued by the kernel (onto a fresh
/// worker's socket after a death; a live worker that was merely slow is
/// dropped and replaced).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long I/O waits for a fresh worker before failing.
pub const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// Most connections per device (the worker refuses more).
pub const MAX_CONNECTIONS: usize = 16;

/// The message of a host without the driver.
pub fn not_loaded() -> DeviceError {
    DeviceError::Unavailable(format!("nbd-kernel: {}", genl::NOT_LOADED))
}

fn genl_err(e: GenlError) -> DeviceError {
    match e {
        GenlError::NotLoaded => not_loaded(),
        e => DeviceError::Failed(format!("nbd-kernel: {e}")),
    }
}

/// What the broker remembers of a connected device.
#[derive(Debug, Clone, Copy)]
struct Connected {
    index: u32,
    /// A DISCONNECT was sent (abandoned); teardown only waits.
    disconnected: bool,
}

/// The kernel nbd [`DeviceBackend`].
#[derive(Debug)]
pub struct NbdKernelBackend {
    minor: Minor,
    /// `/sys/block/nbdN/backend` of our devices.
    ident: String,
    connections: usize,
    size: u64,
    read_only: bool,
    /// Our ends of the socketpairs not yet given to the kernel.
    pending: Vec<UnixStream>,
    dev: Option<Connected>,
    driver: Option<Driver>,
}

/// The backend identifier of `minor`'s device under `state_dir`: unique
/// per broker instance and minor, so a successor finds exactly its own.
pub fn identifier(state_dir: &Path, minor: Minor) -> String {
    format!("tapjail:{}:{}", state_dir.display(), minor.device_name())
}

impl NbdKernelBackend {
    pub fn new(ctx: &DeviceContext) -> Self {
        NbdKernelBackend {
            minor: ctx.minor,
            ident: identifier(&ctx.state_dir, ctx.minor),
            connections: ctx.nbd_kernel_connections.clamp(1, MAX_CONNECTIONS),
            size: 0,
            read_only: false,
            pending: Vec::new(),
            dev: None,
            driver: None,
        }
    }

    /// Take over a device a broker that is gone connected: its record
    /// names `/dev/nbdN`, which must still carry this minor's identifier.
    pub fn adopt(ctx: &DeviceContext, h: &Handoff) -> Result<Self, DeviceError> {
        let mut b = NbdKernelBackend::new(ctx);
        let index = sysfs::index_of(&h.node).ok_or_else(|| {
            DeviceError::Failed(format!(
                "nbd-kernel: adopting: {} is not an nbd device",
                h.node.display()
            ))
        })?;
        let found = sysfs::backend(Path::new(sysfs::SYS_BLOCK), index);
        if found.as_deref() != Some(b.ident.as_str()) {
            return Err(DeviceError::Failed(format!(
                "nbd-kernel: adopting: /dev/nbd{index} is not {}'s device any more \
                 (backend {found:?})",
                b.ident
            )));
        }
        b.size = h.size;
        b.read_only = h.read_only;
        // A respawn replaces every connection the device has: as many as
        // it was connected with, whatever the policy says now. (The
        // kernel's hardware queues do not tell: blk-mq caps them at the
        // CPU count.)
        if let Some(n) = h.nbd_connections {
            b.connections = (n as usize).clamp(1, MAX_CONNECTIONS);
        }
        b.dev = Some(Connected {
            index,
            disconnected: false,
        });
        Ok(b)
    }

    fn driver(&mut self) -> Result<&mut Driver, DeviceError> {
        if self.driver.is_none() {
            self.driver = Some(Driver::open().map_err(genl_err)?);
        }
        Ok(self.driver.as_mut().expect("just set"))
    }

    /// Fresh socketpairs: ours stay pending, the worker's go in `Prepared`.
    fn pairs(&mut self) -> Result<Prepared, DeviceError> {
        let mut theirs = Vec::with_capacity(self.connections);
        let mut ours = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let (a, b) = UnixStream::pair().map_err(|source| DeviceError::Io {
                step: "nbd-kernel: creating a socketpair".into(),
                source,
            })?;
            ours.push(a);
            theirs.push(OwnedFd::from(b));
        }
        self.pending = ours;
        Ok(Prepared {
            spec: FrontendSpec::NbdKernel {
                size: self.size,
                read_only: self.read_only,
                max_io_bytes: MAX_IO_BYTES,
            },
            fds: theirs,
        })
    }

    /// NBD_CMD_CONNECT on the first free device, capping its requests
    /// first; a device taken meanwhile (EBUSY) makes us try the next.
    fn connect(&mut self) -> Result<u32, DeviceError> {
        let ours: Vec<UnixStream> = std::mem::take(&mut self.pending);
        let socks: Vec<BorrowedFd<'_>> = ours.iter().map(|s| s.as_fd()).collect();
        let ident = self.ident.clone();
        let (size, read_only) = (self.size, self.read_only);
        let sys = Path::new(sysfs::SYS_BLOCK);
        let free: Vec<u32> = sysfs::devices(sys)
            .into_iter()
            .filter(|&i| !sysfs::connected(sys, i))
            .collect();
        let driver = self.driver()?;
        let mut c = Connect {
            index: None,
            size,
            block_size: BLOCK_SIZE,
            read_only,
            timeout: REQUEST_TIMEOUT,
            dead_conn_timeout: DEAD_CONN_TIMEOUT,
            backend: &ident,
            socks: &socks,
        };
        for index in free {
            if let Err(e) = sysfs::set_max_sectors_kb(index, MAX_IO_BYTES >> 10) {
                tapjail_common::log_line!(
                    "tap-broker: nbd-kernel: nbd{index}: setting max_sectors_kb: {e}; trying another"
                );
                continue;
            }
            c.index = Some(index);
            match driver.connect(&c) {
                Ok(i) => return Ok(i),
                Err(e) if e.errno() == Some(libc::EBUSY) => continue,
                Err(e) => return Err(genl_err(e)),
            }
        }
        // Every existing device is busy: let the kernel make one, then cap
        // it (only its own partition scan can have run in between, with
        // requests well under the cap).
        c.index = None;
        let index = driver.connect(&c).map_err(genl_err)?;
        if let Err(e) = sysfs::set_max_sectors_kb(index, MAX_IO_BYTES >> 10) {
            let _ = driver.disconnect(index);
            return Err(DeviceError::Io {
                step: format!("nbd-kernel: nbd{index}: setting max_sectors_kb"),
                source: e,
            });
        }
        Ok(index)
    }

    fn index(&self) -> Option<u32> {
        self.dev.map(|d| d.index)
    }
}

impl DeviceBackend for NbdKernelBackend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::NbdKernel
    }

    fn prepare(&mut self, size: u64, read_only: bool) -> Result<Prepared, DeviceError> {
        if self.dev.is_some() || !self.pending.is_empty() {
            return Err(DeviceError::Failed(format!(
                "nbd-kernel: {} is already prepared",
                self.minor.device_name()
            )));
        }
        if size < BLOCK_SIZE {
            return Err(DeviceError::Failed(format!(
                "nbd-kernel: a {size}-byte disk has no whole {BLOCK_SIZE}-byte block"
            )));
        }
        // Fail here, before any worker is told to serve, if the driver is
        // missing: "kernel nbd driver not loaded".
        self.driver()?;
        self.size = size;
        self.read_only = read_only;
        self.pairs()
    }

    fn activate(&mut self, _worker_pid: u32) -> Result<PathBuf, DeviceError> {
        if self.dev.is_some() {
            return Err(DeviceError::Failed("nbd-kernel: already connected".into()));
        }
        if self.pending.is_empty() {
            return Err(DeviceError::Failed(
                "nbd-kernel: activate before prepare".into(),
            ));
        }
        let index = self.connect()?;
        self.dev = Some(Connected {
            index,
            disconnected: false,
        });
        sysfs::check_node(index).map_err(|source| DeviceError::Io {
            step: format!("nbd-kernel: checking /dev/nbd{index}"),
            source,
        })
    }

    fn recover(&mut self) -> Result<Prepared, DeviceError> {
        match self.dev {
            Some(d) if !d.disconnected => self.pairs(),
            Some(d) => Err(DeviceError::Failed(format!(
                "nbd-kernel: /dev/nbd{} was disconnected; it cannot be recovered",
                d.index
            ))),
            None => Err(DeviceError::Failed(
                "nbd-kernel: the worker died before the device was connected; \
                 tear it down and prepare it again"
                    .into(),
            )),
        }
    }

    fn recovered(&mut self, _worker_pid: u32) -> Result<(), DeviceError> {
        let index = self
            .index()
            .ok_or_else(|| DeviceError::Failed("nbd-kernel: recovered without a device".into()))?;
        let ours = std::mem::take(&mut self.pending);
        if ours.is_empty() {
            return Err(DeviceError::Failed(
                "nbd-kernel: recovered before recover".into(),
            ));
        }
        let socks: Vec<BorrowedFd<'_>> = ours.iter().map(|s| s.as_fd()).collect();
        let ident = self.ident.clone();
        self.driver()?
            .reconfigure(index, &ident, DEAD_CONN_TIMEOUT, &socks)
            .map_err(genl_err)
    }

    /// Push the page cache of `/dev/nbdN` through the worker. Closing does
    /// no more here: the worker is told to stop next, and `teardown`
    /// disconnects once it has.
    fn sync(&mut self, _closing: bool) -> Result<(), DeviceError> {
        let Some(Connected {
            index,
            disconnected: false,
        }) = self.dev
        else {
            return Ok(());
        };
        let node = sysfs::node(index);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&node)
            .map_err(|source| DeviceError::Io {
                step: format!("nbd-kernel: opening {} to flush it", node.display()),
                source,
            })?;
        f.sync_all().map_err(|source| DeviceError::Io {
            step: format!("nbd-kernel: flushing {}", node.display()),
            source,
        })
    }

    fn in_use(&self) -> bool {
        let Some(index) = self.index() else {
            return false;
        };
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(sysfs::node(index))
        {
            Ok(_) => false,
            Err(e) => e.raw_os_error() == Some(libc::EBUSY),
        }
    }

    /// Disconnect now: the I/O waiting for a worker fails instead of
    /// waiting out the dead-connection timeout. `/dev/nbdN` stays (the
    /// kernel's devices outlive their connections) until teardown.
    fn abandon(&mut self) -> Result<(), DeviceError> {
        let Some(index) = self.dev.filter(|d| !d.disconnected).map(|d| d.index) else {
            return Ok(());
        };
        self.driver()?.disconnect(index).map_err(genl_err)?;
        if let Some(d) = self.dev.as_mut() {
            d.disconnected = true;
        }
        Ok(())
    }

    fn handoff(&self) -> Option<HandoffFds<'_>> {
        let d = self.dev.filter(|d| !d.disconnected)?;
        Some((
            Handoff {
                kind: FrontendKind::NbdKernel.as_str().into(),
                size: self.size,
                read_only: self.read_only,
                node: sysfs::node(d.index),
                nbd_connections: Some(self.connections as u32),
                ..Default::default()
            },
            Vec::new(),
        ))
    }

    fn teardown(&mut self) -> Result<(), DeviceError> {
        self.pending.clear();
        let Some(d) = self.dev else {
            self.driver = None;
            return Ok(());
        };
        let driver = match self.driver() {
            Ok(drv) => drv,
            // The module is gone, and every device with it.
            Err(DeviceError::Unavailable(_)) => {
                self.dev = None;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !d.disconnected {
            match driver.disconnect(d.index) {
                Ok(()) => {}
                // Already gone (EINVAL: no such device).
                Err(e) if e.errno() == Some(libc::EINVAL) => {}
                Err(e) => return Err(genl_err(e)),
            }
            if let Some(dev) = self.dev.as_mut() {
                dev.disconnected = true;
            }
        }
        let driver = self.driver.as_mut().expect("opened above");
        wait_free(driver, d.index)?;
        self.dev = None;
        self.driver = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(dir: &Path) -> DeviceContext {
        DeviceContext {
            minor: Minor::new(5).unwrap(),
            state_dir: dir.to_path_buf(),
            nbd_kernel_connections: 1,
        }
    }

    /// The real netlink path on a host without nbd.ko (this one): the
    /// family lookup fails and `prepare` says what to load, having made
    /// nothing for a worker.
    #[test]
    fn nbd_kernel_prepare_without_the_driver_says_kernel_nbd_driver_not_loaded() {
        if !tapjail_testsupport::require(
            !Path::new("/sys/module/nbd").exists(),
            "this host has no nbd module loaded (nestvm has one)",
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut b = NbdKernelBackend::new(&ctx(dir.path()));
        let e = b.prepare(1 << 20, false).unwrap_err();
        assert!(matches!(e, DeviceError::Unavailable(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("nbd-kernel: kernel nbd driver not loaded:"),
            "{msg}"
        );
        assert!(msg.contains("modprobe nbd"), "{msg}");
        assert!(b.pending.is_empty() && b.dev.is_none());
        assert!(b.activate(1).is_err(), "nothing to activate");
        b.teardown().unwrap();
        // Nothing of ours is connected, so a successor has nothing to clean.
        assert!(cleanup_stale(&ctx(dir.path())).unwrap().is_empty());
    }

    #[test]
    fn nbd_kernel_identifier_names_the_broker_and_the_minor() {
        let a = identifier(Path::new("/var/lib/tapjail"), Minor::new(1).unwrap());
        let b = identifier(Path::new("/var/lib/tapjail"), Minor::new(10).unwrap());
        let c = identifier(Path::new("/tmp/other"), Minor::new(1).unwrap());
        assert_eq!(a, "tapjail:/var/lib/tapjail:tapdev1");
        assert!(a != b && a != c && !b.starts_with(&format!("{a}:")));
    }

    #[test]
    fn nbd_kernel_recover_before_connect_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = NbdKernelBackend::new(&DeviceContext {
            nbd_kernel_connections: 99,
            ..ctx(dir.path())
        });
        assert_eq!(b.connections, MAX_CONNECTIONS);
        assert!(b
            .recover()
            .unwrap_err()
            .to_string()
            .contains("before the device was connected"));
        assert!(b.recovered(1).is_err());
        assert!(b.handoff().is_none());
        assert!(!b.in_use());
    }
}
