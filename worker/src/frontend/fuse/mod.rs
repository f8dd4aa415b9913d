//! The FUSE frontend: serves the disk as one regular file on a `/dev/fuse`
//! connection the broker opened and mounted; the broker puts a loop device
//! on top of that file.
//!
//! # Why no FUSE crate
//!
//! `fuser` (and `fuse-backend-rs`, `polyfuse`) were considered. They want
//! to mount the filesystem themselves and own the session loop, which
//! fits a confined worker that holds only a pre-opened fd poorly — and one
//! thing rules them out: a worker that takes over a recovered connection
//! never sees INIT (the dead worker answered it), and `fuser` answers every
//! request before INIT with EIO, which is exactly the failure recovery must
//! avoid. None of them sends `FUSE_NOTIFY_RESEND`. What we need is ~15
//! fixed-layout messages, so they are written here: the ABI slice in
//! [`abi`], a pure bounds-checked parser in [`request`] (fuzzed), the
//! one-file filesystem in [`fs`] and raw syscalls in `dev`.
//!
//! # Threads, not FUSE over io_uring
//!
//! The device is read by several threads (each a plain `read(2)` of one
//! request and a `writev(2)` of its reply). FUSE over io_uring
//! (`CONFIG_FUSE_IO_URING`, Linux 6.14) was not used: the module keeps it
//! off unless `fuse.enable_uring=1` is set host-wide, it needs a ring
//! entry registered for every CPU, and requests held by a dead worker's
//! ring entries are not covered by `FUSE_NOTIFY_RESEND`, which only
//! re-queues the `/dev/fuse` processing lists — recovery, the reason this
//! frontend exists, would be lost. The measured cost of the `/dev/fuse`
//! hop is in `bench/fuse.sh`'s table.
//!
//! # Recovery
//!
//! The broker keeps its own dup of the connection, so the mount survives a
//! dead worker. A fresh worker started with `resend: true` writes
//! `FUSE_NOTIFY_RESEND` before serving: the kernel moves every request the
//! dead worker had read but not answered back to the input queue (their
//! `unique` gains bit 63, which we echo like any other). Requests are
//! idempotent at the image level (positioned writes, flushes, zeroing), so
//! replaying a half-done one is safe.

pub mod abi;
mod dev;
pub mod fs;
pub mod request;

use crate::disk::Disk;
use crate::frontend::{Frontend, FrontendError};
use fs::{OneFileFs, Outcome};
use request::{MAX_READ, MAX_WRITE};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Threads reading `/dev/fuse` when the spec does not say otherwise. With
/// loop's async direct I/O the kernel keeps up to 128 requests queued, so
/// more threads than cores still help while some wait on image I/O.
pub const DEFAULT_THREADS: usize = 4;

/// Stack per serving thread: the request path is shallow, and with
/// `mlockall(MCL_FUTURE)` every stack byte is locked memory.
const THREAD_STACK: usize = 256 * 1024;

const PAGE: usize = 4096;
/// Bytes in front of WRITE data: `fuse_in_header` + `fuse_write_in`.
const WRITE_PREFIX: usize = abi::IN_HEADER_LEN + abi::WRITE_IN_LEN;

/// How the worker serves a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseConfig {
    /// Name of the one file at the root (the broker opens it).
    pub file_name: String,
    /// The connection was served by a worker that died: send
    /// `FUSE_NOTIFY_RESEND` first and expect no INIT.
    pub resend: bool,
    /// Threads reading the device (at least 1; the calling thread is one).
    pub threads: usize,
}

/// Makes a running [`FuseFrontend::serve`] return once in-flight requests
/// are answered.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<Stop>);

#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    efd: OwnedFd,
}

impl Stop {
    fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // A full eventfd counter (EAGAIN) is still readable; any other
        // failure leaves the flag, checked before every read.
        let _ = dev::signal(self.efd.as_fd());
    }
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl StopHandle {
    pub fn stop(&self) {
        self.0.stop()
    }
}

type ReadyFn = Box<dyn FnOnce() + Send>;

/// A FUSE connection served by a few threads.
pub struct FuseFrontend {
    dev: OwnedFd,
    config: FuseConfig,
    stop: Arc<Stop>,
    on_ready: Option<ReadyFn>,
    protocol_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for FuseFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseFrontend")
            .field("dev", &self.dev)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl FuseFrontend {
    /// `dev` is the `/dev/fuse` connection, already mounted by the broker.
    pub fn new(dev: OwnedFd, config: FuseConfig) -> Result<Self, FrontendError> {
        let efd = dev::eventfd().map_err(|source| FrontendError::Io {
            step: "eventfd",
            source,
        })?;
        Ok(FuseFrontend {
            dev,
            config,
            stop: Arc::new(Stop {
                flag: AtomicBool::new(false),
                efd,
            }),
            on_ready: None,
            protocol_errors: Arc::default(),
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Called once the connection is usable: INIT answered, or on a
    /// recovered connection, the resend notification delivered. The worker
    /// reports `Serving` to the broker from here.
    pub fn on_ready(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_ready = Some(Box::new(f));
    }

    /// Malformed requests seen (each answered EINVAL or dropped).
    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors.load(Ordering::Relaxed)
    }
}

/// What the serving threads share.
struct Shared<'a> {
    dev: BorrowedFd<'a>,
    fs: OneFileFs,
    stop: &'a Stop,
    ready: Mutex<Option<ReadyFn>>,
    error: Mutex<Option<FrontendError>>,
    protocol_errors: &'a AtomicU64,
}

impl Shared<'_> {
    fn fire_ready(&self) {
        let f = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(f) = f {
            f();
        }
    }

    /// Record the first fatal error and stop every thread.
    fn fail(&self, e: FrontendError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.stop();
    }
}

impl Frontend for FuseFrontend {
    fn kind(&self) -> &'static str {
        "fuse"
    }

    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError> {
        let io = |step| move |source| FrontendError::Io { step, source };
        dev::set_nonblocking(self.dev.as_fd()).map_err(io("set /dev/fuse non-blocking"))?;
        let shared = Shared {
            dev: self.dev.as_fd(),
            fs: OneFileFs::new(disk, &self.config.file_name),
            stop: &self.stop,
            ready: Mutex::new(self.on_ready.take()),
            error: Mutex::new(None),
            protocol_errors: &self.protocol_errors,
        };
        if self.config.resend {
            notify_resend(shared.dev)?;
            shared.fire_ready();
        }
        std::thread::scope(|s| {
            for i in 1..self.config.threads.max(1) {
                let spawned = std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .stack_size(THREAD_STACK)
                    .spawn_scoped(s, || serve_thread(&shared));
                if let Err(e) = spawned {
                    // RLIMIT_NPROC or memory: serve with fewer threads
                    // rather than not at all.
                    eprintln!("tapdisk: fuse: serving with {i} threads: {e}");
                    break;
                }
            }
            serve_thread(&shared);
        });
        match shared.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Tell the kernel to re-queue every request a dead worker had read.
fn notify_resend(dev: BorrowedFd<'_>) -> Result<(), FrontendError> {
    let mut h = [0u8; abi::OUT_HEADER_LEN];
    abi::Writer::new(&mut h)
        .u32(0, abi::OUT_HEADER_LEN as u32)
        .i32(4, abi::NOTIFY_RESEND)
        .u64(8, 0);
    match dev::writev(dev, &[&h]) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(FrontendError::Unavailable(
            "fuse: the kernel lacks FUSE_NOTIFY_RESEND (Linux >= 6.9); \
             requests of the dead worker cannot be recovered"
                .into(),
        )),
        Err(source) => Err(FrontendError::Io {
            step: "write FUSE_NOTIFY_RESEND",
            source,
        }),
    }
}

/// A request buffer whose WRITE payload lands page-aligned (so an image
/// opened `O_DIRECT` can use it as is), and whose READ reply data area is
/// page-aligned too.
struct IoBuf {
    mem: Vec<u8>,
    /// Offset of the page-aligned data area.
    data: usize,
}

impl IoBuf {
    fn new() -> Self {
        let mem = vec![0u8; MAX_WRITE.max(MAX_READ) + 2 * PAGE];
        let align = mem.as_ptr().align_offset(PAGE);
        // align < PAGE, so data < 2 * PAGE and data + MAX_WRITE fits; and
        // data >= PAGE > WRITE_PREFIX.
        IoBuf {
            data: align.min(PAGE - 1) + PAGE,
            mem,
        }
    }
    /// Where `read(2)` puts a request: the kernel wants room for
    /// `max_write` plus the WRITE headers.
    fn request_area(&mut self) -> &mut [u8] {
        &mut self.mem[self.data - WRITE_PREFIX..self.data + MAX_WRITE]
    }
    fn request(&self, n: usize) -> &[u8] {
        let start = self.data - WRITE_PREFIX;
        &self.mem[start..start + n.min(WRITE_PREFIX + MAX_WRITE)]
    }
    fn data_area(&mut self) -> &mut [u8] {
        &mut self.mem[self.data..self.data + MAX_READ]
    }
}

fn serve_thread(shared: &Shared<'_>) {
    let mut buf = IoBuf::new();
    while !shared.stop.stopped() {
        match dev::read(shared.dev, buf.request_area()) {
            Ok(n) => {
                if let Err(e) = process(shared, &mut buf, n) {
                    shared.fail(e);
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    if let Err(source) = dev::wait_readable(shared.dev, shared.stop.efd.as_fd()) {
                        shared.fail(FrontendError::Io {
                            step: "poll /dev/fuse",
                            source,
                        });
                    }
                }
                // A signal, or a request interrupted before we got it.
                Some(libc::EINTR) | Some(libc::ENOENT) => {}
                // Unmounted or aborted: the kernel side is gone.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => shared.stop.stop(),
                _ => shared.fail(FrontendError::Io {
                    step: "read /dev/fuse",
                    source: e,
                }),
            },
        }
    }
}

/// Handle one request of `n` bytes in `buf` and send its reply.
fn process(shared: &Shared<'_>, buf: &mut IoBuf, n: usize) -> Result<(), FrontendError> {
    let (unique, outcome) = match request::parse(buf.request(n)) {
        Ok(req) => (req.header.unique, shared.fs.handle(&req)),
        Err(e) => {
            shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
            match e {
                request::ParseError::BadArgument { unique, opcode, .. }
                    if request::expects_reply(opcode) =>
                {
                    (unique, Outcome::Err(libc::EINVAL))
                }
                // No usable header: nothing can be answered.
                _ => return Ok(()),
            }
        }
    };
    match outcome {
        Outcome::Ok(p) => reply(shared, unique, 0, p.bytes()),
        Outcome::Err(errno) => reply(shared, unique, errno, &[]),
        Outcome::None => Ok(()),
        Outcome::Read(r) => {
            let data = buf.data_area();
            match shared.fs.read(&r, data) {
                Ok(len) => reply(shared, unique, 0, &data[..len]),
                Err(errno) => reply(shared, unique, errno, &[]),
            }
        }
        Outcome::Initialized(p) => {
            reply(shared, unique, 0, p.bytes())?;
            shared.fire_ready();
            Ok(())
        }
        Outcome::InitRefused(errno) => {
            reply(shared, unique, errno, &[])?;
            Err(FrontendError::Unavailable(format!(
                "fuse: kernel protocol older than 7.{} is not supported",
                abi::MIN_KERNEL_MINOR
            )))
        }
    }
}

/// Send one reply: `errno` 0 for success with `payload`.
fn reply(
    shared: &Shared<'_>,
    unique: u64,
    errno: i32,
    payload: &[u8],
) -> Result<(), FrontendError> {
    let payload = if errno == 0 { payload } else { &[] };
    let len = abi::OUT_HEADER_LEN + payload.len(); // payload <= MAX_READ
    let mut h = [0u8; abi::OUT_HEADER_LEN];
    abi::Writer::new(&mut h)
        .u32(0, len as u32)
        .i32(4, -errno)
        .u64(8, unique);
    match dev::writev(shared.dev, &[&h, payload]) {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_os_error() {
            // The request was interrupted or aborted meanwhile.
            Some(libc::ENOENT) => Ok(()),
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => {
                shared.stop.stop();
                Ok(())
            }
            _ => Err(FrontendError::Io {
                step: "write /dev/fuse reply",
                source: e,
            }),
        },
    }
}
