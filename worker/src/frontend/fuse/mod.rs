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
mod buf;
mod dev;
pub mod fs;
mod lanes;
pub mod request;
mod serve;

use crate::disk::Disk;
use crate::frontend::{Frontend, FrontendError, Stopper};
use buf::{BigPool, IoBuf};
use fs::OneFileFs;
use lanes::Lanes;

use serve::{process, read_reply, serve_thread, write_reply};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Threads serving the device when the spec does not say otherwise. Each
/// serves one request at a time, so this is the depth the image sees:
/// 4 KiB random reads at depth 32 on a plain loop device measured 11.5k
/// IOPS at depth 1, 16.6k at 5, 23.7k at 8 and 35k at 16. A thread costs
/// its stack and a small buffer (~100 KiB locked); `plan` caps the count
/// by the RLIMIT_MEMLOCK headroom.
pub const DEFAULT_THREADS: usize = 16;
/// Most big (`read(2)`-sized) buffers: the depth for requests larger than
/// a thread's small buffer (1 MiB I/O arrives as 256 KiB requests).
const MAX_BIG: usize = 8;

/// Stack of a serving thread. It runs the image engine, whose deepest
/// path (a VHD chain read/write through io_uring, debug build) ran in
/// 24 KiB (see `nbd::sizing::IO_STACK`, sized the same way); parsing and
/// replying add a few hundred bytes.
const SERVE_STACK: usize = 64 * 1024;

/// How long the handshake waits for the kernel's INIT. The kernel queues
/// INIT when the broker mounts, before the worker gets the fd, so it is
/// normally there at once; the bound only keeps a broken setup from
/// wedging the worker's control thread.
const INIT_TIMEOUT_MS: i32 = 30_000;

/// Kept free under RLIMIT_MEMLOCK for allocations nobody budgets (control
/// frames, bitmap copies, allocator slack); the open image's tables and
/// caches are already taken out of the headroom (`tapjail_image::memory`,
/// `sandbox::mlock::headroom`). The engine no longer makes
/// block-sized allocations while serving (see `image::zeroes`), but with
/// only 1 MiB kept a worker under an 8 MiB limit once aborted on one.
const RESERVE: u64 = 2 << 20;
/// Per-thread overhead besides stack and buffer (guard page, TLS, tcache).
const THREAD_OVERHEAD: u64 = 16 * 1024;

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

/// What every serving thread may wait on, so stopping can wake them all:
/// the device (through `efd`) or a big buffer (`pool`).
#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    efd: OwnedFd,
    pool: BigPool,
}

impl Stop {
    fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // A full eventfd counter (EAGAIN) is still readable; any other
        // failure leaves the flag, checked before every read.
        let _ = dev::signal(self.efd.as_fd());
        self.pool.close();
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

/// A FUSE connection served by a few threads.
#[derive(Debug)]
pub struct FuseFrontend {
    dev: OwnedFd,
    config: FuseConfig,
    stop: Arc<Stop>,
    /// The connection is usable: INIT answered, or resend delivered.
    ready: bool,
    protocol_errors: AtomicU64,
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
                pool: BigPool::default(),
            }),
            ready: false,
            protocol_errors: AtomicU64::new(0),
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Malformed requests seen (each answered EINVAL or dropped).
    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors.load(Ordering::Relaxed)
    }

    fn shared(&self, disk: Arc<Disk>) -> Shared<'_> {
        Shared {
            dev: self.dev.as_fd(),
            fs: OneFileFs::new(disk, &self.config.file_name),
            stop: &self.stop,
            initialized: AtomicBool::new(false),
            error: Mutex::new(None),
            protocol_errors: &self.protocol_errors,
            lanes: Lanes::default(),
        }
    }

    /// Make the connection usable before the broker touches the mount:
    /// answer INIT, or on a recovered connection send `FUSE_NOTIFY_RESEND`
    /// (INIT was answered by the dead worker). Runs on the caller's thread;
    /// the worker reports `Serving` once it returns.
    pub fn handshake(&mut self, disk: &Arc<Disk>) -> Result<(), FrontendError> {
        if self.ready {
            return Ok(());
        }
        dev::set_nonblocking(self.dev.as_fd()).map_err(|source| FrontendError::Io {
            step: "set /dev/fuse non-blocking",
            source,
        })?;
        if self.config.resend {
            notify_resend(self.dev.as_fd())?;
            self.ready = true;
            return Ok(());
        }
        let shared = self.shared(disk.clone());
        let mut buf = IoBuf::big()?;
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_millis(INIT_TIMEOUT_MS.unsigned_abs().into());
        while !shared.initialized.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Protocol(
                    "fuse: no INIT from the kernel within 30 s".into(),
                ));
            }
            match dev::read(shared.dev, buf.request_area()) {
                Ok(0) => {
                    return Err(FrontendError::Protocol(
                        "fuse: connection closed before INIT".into(),
                    ))
                }
                Ok(n) => process(&shared, &mut buf, n)?,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        let ms = i32::try_from(left.as_millis()).unwrap_or(INIT_TIMEOUT_MS);
                        dev::wait_readable(shared.dev, shared.stop.efd.as_fd(), ms.max(1))
                            .map_err(|source| FrontendError::Io {
                                step: "poll /dev/fuse for INIT",
                                source,
                            })?;
                        if shared.stop.stopped() {
                            return Err(FrontendError::Protocol(
                                "fuse: stopped before INIT".into(),
                            ));
                        }
                    }
                    Some(libc::EINTR) | Some(libc::ENOENT) => {}
                    _ => {
                        return Err(FrontendError::Io {
                            step: "read INIT from /dev/fuse",
                            source: e,
                        })
                    }
                },
            }
            if let Some(e) = shared.take_error() {
                return Err(e);
            }
        }
        self.ready = true;
        Ok(())
    }
}

/// What the serving threads share.
struct Shared<'a> {
    dev: BorrowedFd<'a>,
    fs: OneFileFs,
    stop: &'a Stop,
    initialized: AtomicBool,
    error: Mutex<Option<FrontendError>>,
    protocol_errors: &'a AtomicU64,
    /// Delayed small requests, per direction (`lanes`).
    lanes: Lanes,
}

impl Shared<'_> {
    /// Record the first fatal error and stop every thread.
    fn fail(&self, e: FrontendError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.stop();
    }

    fn take_error(&self) -> Option<FrontendError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Frontend for FuseFrontend {
    fn kind(&self) -> &'static str {
        "fuse"
    }

    /// Answer INIT (or send the resend notification) on the control thread,
    /// so the worker reports `Serving` only once the mount is usable.
    fn start(&mut self, disk: &Arc<Disk>) -> Result<(), FrontendError> {
        self.handshake(disk)
    }

    fn stopper(&self) -> Option<Stopper> {
        let stop = self.stop_handle();
        Some(Box::new(move || stop.stop()))
    }

    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError> {
        self.handshake(&disk)?;
        let shared = self.shared(disk);
        let plan = Plan::new(self.config.threads, crate::sandbox::mlock::headroom());
        if plan.threads < self.config.threads {
            tracing::warn!(
                frontend = "fuse",
                "{} of {} serving threads and {} big buffers fit under RLIMIT_MEMLOCK \
                 (throttle lanes: {}, {} write slots)",
                plan.threads,
                self.config.threads,
                plan.big,
                if plan.lanes { "on" } else { "off" },
                plan.spares
            );
        }
        let pool = &self.stop.pool;
        pool.fill(plan.big)?;
        let mut own = IoBuf::small()?;
        std::thread::scope(|s| {
            if plan.lanes {
                lanes::start(s, &shared, plan.spares);
            }
            let mut serving = Vec::with_capacity(plan.threads);
            for i in 1..plan.threads {
                // Buffer first: if it does not fit, neither would a thread.
                let Ok(mut buf) = IoBuf::small() else {
                    tracing::warn!(
                        frontend = "fuse",
                        "serving with {i} of {} threads (memory)",
                        plan.threads
                    );
                    break;
                };
                let shared = &shared;
                let spawned = std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .stack_size(SERVE_STACK)
                    .spawn_scoped(s, move || serve_thread(shared, &mut buf));
                let spawned = spawned.map(|t| serving.push(t));
                if let Err(e) = spawned {
                    // RLIMIT_NPROC or memory: serve with fewer threads
                    // rather than not at all.
                    tracing::warn!(
                        frontend = "fuse",
                        "serving with {i} of {} threads: {e}",
                        plan.threads
                    );
                    break;
                }
            }
            serve_thread(&shared, &mut own);
            // Nobody hands the lanes anything once every serving thread
            // is done; they serve what they hold and end.
            for t in serving {
                let _ = t.join();
            }
            shared.lanes.close();
        });
        pool.clear();
        match shared.take_error() {
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

/// How many serving threads and big buffers to run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    threads: usize,
    big: usize,
    /// Run the two throttle lanes (`lanes`).
    lanes: bool,
    /// Slots for delayed writes (a page each) handed to their lane.
    spares: usize,
}

impl Plan {
    /// Fit `wanted` threads (at least 1, the caller's) and their big
    /// buffers in `headroom` bytes of lockable memory (`None`: no limit).
    /// Half the room goes to big buffers (the depth for large requests),
    /// the rest to threads (the depth for small ones): with a third, two
    /// big buffers fit under an 8 MiB limit and 1 MiB sequential reads
    /// measured 10% below five threads that each had one.
    fn new(wanted: usize, headroom: Option<u64>) -> Plan {
        let wanted = wanted.max(1);
        let Some(room) = headroom else {
            return Plan {
                threads: wanted,
                big: wanted.min(MAX_BIG),
                lanes: true,
                spares: lanes::MAX_SPARES,
            };
        };
        let room = room.saturating_sub(RESERVE);
        let big_cost = IoBuf::BIG_LEN as u64;
        let thread_cost = SERVE_STACK as u64 + THREAD_OVERHEAD + IoBuf::SMALL_LEN as u64;
        let clamp = |n: u64, hi: usize| usize::try_from(n).unwrap_or(usize::MAX).clamp(1, hi);
        let big = clamp(room / 2 / big_cost, MAX_BIG.min(wanted));
        let left = room.saturating_sub(big as u64 * big_cost);
        // The throttle pacer (a thread and its buffer) comes first when a
        // serving thread fits besides; half the rest goes to its
        // slots (a delayed write of a page each, a twelfth of a thread).
        let pacer_cost = thread_cost;
        let slot = IoBuf::SLOT_LEN as u64;
        let lanes = left >= pacer_cost + thread_cost;
        let (left, spares) = if lanes {
            let rest = left - pacer_cost;
            let spares = usize::try_from(rest / 2 / slot)
                .unwrap_or(usize::MAX)
                .min(lanes::MAX_SPARES);
            (rest - spares as u64 * slot, spares)
        } else {
            (left, 0)
        };
        let threads = clamp(left / thread_cost, wanted);
        Plan {
            threads,
            big: big.min(threads),
            lanes,
            spares,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::abi::ReadNe;
    use super::request::tests::{msg, read_arg, write_arg};
    use super::*;
    use crate::image::raw::RawImage;
    use request::MAX_READ;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    /// A SOCK_SEQPACKET pair: one message per read, like /dev/fuse.
    fn fake_kernel() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is a live array of two ints.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: two fresh fds we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(k: &OwnedFd, m: &[u8]) {
        assert_eq!(dev::writev(k.as_fd(), &[m]).unwrap(), m.len());
    }

    /// Receive one reply: (error, unique, payload).
    fn recv(k: &OwnedFd) -> (i32, u64, Vec<u8>) {
        let mut b = vec![0u8; MAX_READ + 64];
        let n = dev::read(k.as_fd(), &mut b).unwrap();
        let b = &b[..n];
        assert_eq!(b.u32_at(0).unwrap() as usize, n);
        (
            b.u32_at(4).unwrap() as i32,
            b.u64_at(8).unwrap(),
            b[abi::OUT_HEADER_LEN..].to_vec(),
        )
    }

    fn disk(len: u64) -> (tempfile::NamedTempFile, Arc<Disk>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        (f, Disk::new(Arc::new(img)))
    }

    fn config(resend: bool) -> FuseConfig {
        FuseConfig {
            file_name: "disk".into(),
            resend,
            threads: 3,
        }
    }

    fn init_msg(unique: u64) -> Vec<u8> {
        let mut a = vec![0u8; 64];
        abi::Writer::new(&mut a)
            .u32(0, 7)
            .u32(4, 41)
            .u32(12, (abi::FUSE_INIT_EXT | abi::FUSE_ASYNC_DIO) as u32);
        msg(abi::INIT, unique, 0, &a)
    }

    #[test]
    fn server_handshakes_serves_and_stops_on_request() {
        let (kernel, worker) = fake_kernel();
        let (_f, disk) = disk(1 << 20);
        let mut fe = FuseFrontend::new(worker, config(false)).unwrap();
        send(&kernel, &init_msg(1));
        fe.handshake(&disk).unwrap();
        let (err, unique, init) = recv(&kernel);
        assert_eq!((err, unique), (0, 1));
        assert_eq!(init.u32_at(0), Some(7));
        let stop = fe.stop_handle();
        let d = disk.clone();
        let server = std::thread::spawn(move || fe.serve(d));
        // A resent request keeps its marked unique in the reply.
        let resent = 5 | abi::UNIQUE_RESEND;
        send(
            &kernel,
            &msg(abi::WRITE, resent, fs::FILE_ID, &write_arg(512, b"tap")),
        );
        assert_eq!(recv(&kernel).1, resent);
        send(&kernel, &msg(abi::FORGET, 6, fs::FILE_ID, &[0u8; 8]));
        send(&kernel, &msg(abi::READ, 7, fs::FILE_ID, &read_arg(511, 5)));
        let (err, unique, data) = recv(&kernel);
        assert_eq!((err, unique), (0, 7), "FORGET must not be answered");
        assert_eq!(data, b"\0tap\0");
        // A malformed READ is answered EINVAL, and serving goes on.
        send(&kernel, &msg(abi::READ, 8, fs::FILE_ID, &[0u8; 4]));
        assert_eq!(recv(&kernel).0, -libc::EINVAL);
        stop.stop();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn server_returns_when_the_kernel_side_goes_away() {
        let (kernel, worker) = fake_kernel();
        let (_f, disk) = disk(4096);
        let mut fe = FuseFrontend::new(worker, config(false)).unwrap();
        send(&kernel, &init_msg(1));
        fe.handshake(&disk).unwrap();
        recv(&kernel);
        let server = std::thread::spawn(move || fe.serve(disk));
        std::thread::sleep(Duration::from_millis(50));
        drop(kernel);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn resend_handshake_sends_the_notification_and_expects_no_init() {
        let (kernel, worker) = fake_kernel();
        let (_f, disk) = disk(4096);
        let mut fe = FuseFrontend::new(worker, config(true)).unwrap();
        fe.handshake(&disk).unwrap();
        let (err, unique, payload) = recv(&kernel);
        assert_eq!((err, unique), (abi::NOTIFY_RESEND, 0));
        assert!(payload.is_empty());
        // The first request may be anything: no INIT comes again.
        let d = disk.clone();
        let stop = fe.stop_handle();
        let server = std::thread::spawn(move || fe.serve(d));
        send(&kernel, &msg(abi::GETATTR, 9, fs::FILE_ID, &[0u8; 16]));
        let (err, unique, attr) = recv(&kernel);
        assert_eq!((err, unique), (0, 9));
        assert_eq!(attr.u64_at(16 + 8), Some(4096));
        stop.stop();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn threads_big_buffers_and_lanes_are_planned_from_lockable_memory() {
        let thread = SERVE_STACK as u64 + THREAD_OVERHEAD + IoBuf::SMALL_LEN as u64;
        let big = IoBuf::BIG_LEN as u64;
        let small = IoBuf::SLOT_LEN as u64;
        let unlimited = |threads, big| Plan {
            threads,
            big,
            lanes: true,
            spares: lanes::MAX_SPARES,
        };
        assert_eq!(Plan::new(16, None), unlimited(16, MAX_BIG));
        assert_eq!(Plan::new(4, None), unlimited(4, 4));
        let p = Plan::new(16, Some(512 << 20));
        assert_eq!(
            (p.threads, p.big, p.lanes, p.spares),
            (16, MAX_BIG, true, lanes::MAX_SPARES)
        );
        // 8 MiB limit, ~2 MiB left after the reserve: big buffers in half
        // the room, the pacer, half the rest in write slots, as many
        // threads as the remainder holds.
        let room = 4 * big + 10 * thread;
        let p = Plan::new(32, Some(RESERVE + room));
        assert_eq!(p.big as u64, room / 2 / big);
        assert!(p.lanes);
        let rest = room - p.big as u64 * big - thread;
        assert_eq!(
            p.spares as u64,
            (rest / 2 / small).min(lanes::MAX_SPARES as u64)
        );
        assert_eq!(
            p.threads as u64,
            (rest - p.spares as u64 * small) / thread,
            "{p:?}"
        );
        assert!(
            p.big as u64 * big + (p.threads as u64 + 1) * thread + p.spares as u64 * small <= room
        );
        // Room for one serving thread only: no pacer.
        let p = Plan::new(32, Some(RESERVE + big + thread * 3 / 2));
        assert_eq!((p.threads, p.lanes, p.spares), (1, false, 0), "{p:?}");
        // Too little for even one of each: still 1 and 1, whose buffer
        // allocation then fails with a clear error instead of an abort.
        let none = Plan {
            threads: 1,
            big: 1,
            lanes: false,
            spares: 0,
        };
        assert_eq!(Plan::new(4, Some(0)), none);
        assert_eq!(Plan::new(0, None), unlimited(1, 1));
    }

    #[test]
    fn handshake_refuses_an_old_kernel() {
        let (kernel, worker) = fake_kernel();
        let (_f, disk) = disk(4096);
        let mut fe = FuseFrontend::new(worker, config(false)).unwrap();
        let mut a = vec![0u8; 16];
        abi::Writer::new(&mut a).u32(0, 7).u32(4, 26);
        send(&kernel, &msg(abi::INIT, 1, 0, &a));
        assert!(matches!(
            fe.handshake(&disk),
            Err(FrontendError::Unavailable(_))
        ));
        assert_eq!(recv(&kernel).0, -libc::EPROTO);
    }
}
