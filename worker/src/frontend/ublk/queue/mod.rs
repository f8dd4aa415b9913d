//! One ublk hardware queue, served by one thread with its own io_uring,
//! with the image I/O on the same ring.
//!
//! The driver binds a queue to the task that fetched its tags (commands
//! from any other thread are refused), so this thread talks to the driver:
//! FETCH_REQ for every tag, then for each request COMMIT_AND_FETCH_REQ once
//! it is done, until the driver aborts the tags (STOP_DEV) or we are told
//! to stop.
//!
//! # Many requests in flight on one thread
//! A request is admitted ([`Disk::try_admit`]: counted in flight, so pause
//! and close wait for it) and asked for a direct mapping
//! ([`Image::map_direct`](crate::image::Image::map_direct)). When there is
//! one — the common case of reading or overwriting data that is already
//! allocated — its pieces become READ/WRITE SQEs on the image's files,
//! registered in this ring, straight into the tag's buffer; pieces that
//! read as zero are filled in place. When the last piece completes, the
//! tag is committed. A FLUSH becomes `FSYNC(DATASYNC)` SQEs on the files
//! the image names ([`Image::direct_sync`](crate::image::Image::direct_sync)):
//! writes are committed only after their CQE, so every write the kernel
//! saw complete before the flush is in the file when the fsync starts, and
//! the fsync covers it. A FUA write carries `RWF_DSYNC`.
//!
//! Everything else — allocating writes, bitmap updates, discard, metadata
//! flushes, and every request while the disk is paused — goes to the slow
//! path ([`super::slow`]): a few threads running the synchronous engine,
//! which post results back through an eventfd this ring always has a READ
//! pending on. A slow request never holds up the ring.
//!
//! Buffered (non-`O_DIRECT`) image files take their plain writes with an
//! inline `pwrite` instead of an SQE: io_uring hands a buffered write on
//! most filesystems to an io-wq worker, which serializes writes to one
//! file and adds two context switches to a page-cache copy (see
//! `crate::io::file`). FUA writes, reads and fsyncs stay on the ring.
//!
//! # Buffers
//! Data moves through plain per-tag buffers given with FETCH: the driver
//! copies a WRITE's data into the buffer before handing us the request and
//! copies a READ's data out when we commit. They are page aligned and
//! sized in whole sectors, so `O_DIRECT` files take them as they are. On
//! 6.12 zero copy is not offered, and `UBLK_F_USER_COPY` would add a
//! pread/pwrite on the char device per request for no saving.
//!
//! # Ring restrictions
//! The ring is restricted like a seccomp filter and made before
//! confinement ([`super::rings`]): limited to `URING_CMD`, `READ`, `WRITE`
//! and `FSYNC` on registered files only, and to one registration op
//! (`FILES_UPDATE`), with which the queue thread puts the char device, the
//! slow path's eventfd and, later, the image's files (again after a pause)
//! into its slots. The fds are ones the worker already holds; the ring adds
//! no reach.

use super::mem::{DescArray, IoBuffers};
use super::request::{self, Request};
use super::slow::{Job, SlowPath, PACED_THREADS, SLOW_STACK, SLOW_THREADS};
use crate::disk::{Admission, Disk, Ticket};
use crate::frontend::FrontendError;
use crate::image::direct::{MAX_DIRECT_FILES, MAX_SEGMENTS};
use crate::image::{DirectFile, Mapping, SyncFiles};
use crate::io::ring::Uring;
use io_uring::{opcode, squeue, types};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;
use tapjail_common::ublk_abi::*;

mod direct;

/// How often an idle queue looks at the stop flag and for stale files.
const STOP_POLL: Duration = Duration::from_millis(500);

/// Fixed-file slots of every queue ring.
const CHAR_FILE: types::Fixed = types::Fixed(0);
const WAKE_FILE: types::Fixed = types::Fixed(1);
/// Image file `i` of the current image is in slot `FIRST_IMAGE_SLOT + i`.
pub(super) const FIRST_IMAGE_SLOT: u32 = 2;

/// What a completion is for, in the top half of its `user_data`; the low
/// half is the tag (bits 0-15) and, for image I/O, the piece (16-23).
const KIND_CMD: u64 = 0;
const KIND_IO: u64 = 1;
const KIND_WAKE: u64 = 2;

fn user_data(kind: u64, tag: u16, piece: usize) -> u64 {
    kind << 32 | (piece as u64 & 0xff) << 16 | u64::from(tag)
}

/// What a queue thread needs.
#[derive(Debug, Clone, Copy)]
pub struct QueueParams {
    pub q_id: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> FrontendError {
    move |source| FrontendError::Io { step, source }
}

/// A queue's ring (made before confinement, see [`super::rings`]) with the
/// char device and the slow path's eventfd in its first slots, enabled by
/// this (the queue) thread, which makes it the ring's only submitter.
fn restricted_ring(
    char_fd: BorrowedFd<'_>,
    wake_fd: RawFd,
    depth: u16,
) -> Result<Uring, FrontendError> {
    let ring = super::rings::take(depth)?;
    let sub = ring.submitter();
    sub.register_files_update(0, &[char_fd.as_raw_fd(), wake_fd])
        .map_err(io("put /dev/ublkcN and the queue's eventfd into the ring"))?;
    sub.register_enable_rings()
        .map_err(io("enable the ublk queue ring"))?;
    Ok(ring)
}

fn queue_cmd(op: u32, q: &QueueParams, tag: u16, result: i32, addr: u64) -> squeue::Entry {
    let cmd = UblksrvIoCmd {
        q_id: q.q_id,
        tag,
        result,
        addr,
    };
    opcode::UringCmd16::new(CHAR_FILE, op)
        .cmd(cmd.to_bytes())
        .build()
        .user_data(user_data(KIND_CMD, tag, 0))
}

/// Queue one SQE.
///
/// # Safety
/// Memory the entry points at must stay valid until its completion is
/// reaped (tag buffers and the wake counter live as long as `run`, and are
/// leaked if the ring goes while I/O on them may still be in flight).
unsafe fn push(ring: &mut Uring, sqe: &squeue::Entry) -> Result<(), FrontendError> {
    // SAFETY: the caller's promise.
    if unsafe { ring.submission().push(sqe) }.is_err() {
        ring.submit().map_err(io("io_uring_enter (ublk queue)"))?;
        // SAFETY: as above.
        unsafe { ring.submission().push(sqe) }
            .map_err(|_| FrontendError::Protocol("ublk queue ring is full".into()))?;
    }
    Ok(())
}

/// A request whose image I/O is on the ring.
#[derive(Debug)]
struct Direct<'d> {
    ticket: Ticket<'d>,
    req: Request,
    /// The pieces (READ/WRITE); `None` for a flush.
    mapping: Option<Mapping>,
    /// SQEs not completed yet.
    pending: usize,
    /// Bytes done per piece, for short transfers.
    done: [u64; MAX_SEGMENTS],
    /// First failure (negative errno).
    error: Option<i32>,
}

/// What a tag is doing. Slots live in one vector allocated up front, a
/// slot per tag, so the large variant is stored inline rather than boxed
/// (no allocation per request).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Slot<'d> {
    /// With the driver (fetched, or not yet handed to us).
    Idle,
    Direct(Direct<'d>),
    Slow,
}

/// The image files registered in the ring, for one image generation.
#[derive(Debug, Default)]
struct Files {
    generation: Option<u64>,
    /// Empty: this generation has no direct files (all requests go slow).
    files: Vec<DirectFile>,
}

/// How a request is served directly. Short-lived, on the stack.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Plan {
    Rw(Mapping),
    Sync(SyncFiles),
}

struct Queue<'a, 'd> {
    q: QueueParams,
    disk: &'d Disk,
    stop: &'a AtomicBool,
    ring: Uring,
    descs: &'a DescArray,
    bufs: &'a mut IoBuffers,
    slow: &'a SlowPath<'d>,
    slots: Vec<Slot<'d>>,
    files: Files,
    /// Where the ring's READ of the eventfd lands (8 bytes).
    wake_buf: &'a mut u64,
    /// Tags not aborted by the driver.
    live: usize,
    direct_inflight: usize,
    slow_inflight: usize,
    scratch: Vec<(u16, i32)>,
    /// Requests served on the ring / through the slow path, reported when
    /// the queue ends.
    served_direct: u64,
    served_slow: u64,
    /// Commits pushed since the last `io_uring_enter` (blktap's kicks out).
    commits_queued: bool,
}

impl<'a, 'd> Queue<'a, 'd> {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn inflight(&self) -> usize {
        self.direct_inflight + self.slow_inflight
    }

    fn commit(&mut self, tag: u16, result: i32) -> Result<(), FrontendError> {
        self.slots[usize::from(tag)] = Slot::Idle;
        self.commits_queued = true;
        let sqe = queue_cmd(
            UBLK_U_IO_COMMIT_AND_FETCH_REQ,
            &self.q,
            tag,
            result,
            self.bufs.addr(tag),
        );
        // SAFETY: the command points at the tag's buffer, which lives as
        // long as the ring (see `run`).
        unsafe { push(&mut self.ring, &sqe) }
    }

    fn arm_wake(&mut self) -> Result<(), FrontendError> {
        let sqe = opcode::Read::new(WAKE_FILE, (self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(KIND_WAKE, 0, 0));
        // SAFETY: wake_buf outlives the ring (see `run`).
        unsafe { push(&mut self.ring, &sqe) }
    }

    /// Serve until every tag is aborted, or until stopped and drained.
    fn serve(&mut self, early: Vec<(u64, i32)>) -> Result<(), FrontendError> {
        self.arm_wake()?;
        let mut cqes = early;
        loop {
            for (ud, res) in cqes.drain(..) {
                self.on_completion(ud, res)?;
            }
            if self.live == 0 && self.inflight() == 0 {
                return Ok(());
            }
            if self.stopping() && self.inflight() == 0 {
                // Commits queued since the last wait must reach the driver,
                // or their requests would be re-issued to a successor for
                // nothing. Then dropping the ring hands the queue back.
                return self
                    .ring
                    .submit()
                    .map(|_| ())
                    .map_err(io("io_uring_enter (ublk commit)"));
            }
            let ts = types::Timespec::from(STOP_POLL);
            let args = types::SubmitArgs::new().timespec(&ts);
            if std::mem::take(&mut self.commits_queued) {
                self.disk.counters.kick_out();
            }
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => self.on_idle()?,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(io("io_uring_enter (ublk queue)")(e)),
            }
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes
                .iter()
                .any(|&(ud, res)| ud >> 32 == KIND_CMD && res == UBLK_IO_RES_OK)
            {
                self.disk.counters.kick_in();
            }
        }
    }

    fn on_completion(&mut self, ud: u64, res: i32) -> Result<(), FrontendError> {
        let tag = (ud & 0xffff) as u16;
        match ud >> 32 {
            KIND_CMD => match res {
                // After a stop, new requests stay with the driver, which
                // re-issues them to a successor (or fails them at STOP_DEV).
                UBLK_IO_RES_OK if self.stopping() => Ok(()),
                UBLK_IO_RES_OK => self.start(tag),
                UBLK_IO_RES_ABORT => {
                    self.live = self.live.saturating_sub(1);
                    Ok(())
                }
                // The driver refused a command: that tag's request can
                // neither complete nor be re-fetched. Only a new server
                // (after recovery) can get the queue going again.
                other => Err(FrontendError::Protocol(format!(
                    "ublk queue {} tag {tag}: the driver refused a queue command: {}",
                    self.q.q_id,
                    std::io::Error::from_raw_os_error(-other.min(-1))
                ))),
            },
            KIND_IO => self.on_image_io(tag, ((ud >> 16) & 0xff) as usize, res),
            KIND_WAKE => {
                if res < 0 {
                    return Err(FrontendError::Io {
                        step: "read the ublk queue's eventfd",
                        source: std::io::Error::from_raw_os_error(-res),
                    });
                }
                self.collect_slow()?;
                self.arm_wake()
            }
            _ => Ok(()),
        }
    }

    /// The ring was idle for a while: pick up slow results whose wakeup
    /// we might have raced with (cannot happen, but costs nothing), and
    /// let go of the files of an image that was paused or closed.
    fn on_idle(&mut self) -> Result<(), FrontendError> {
        self.collect_slow()?;
        if self.files.generation.is_some()
            && self.direct_inflight == 0
            && self.disk.open_generation() != self.files.generation
        {
            let empty = [-1; MAX_DIRECT_FILES];
            let _ = self
                .ring
                .submitter()
                .register_files_update(FIRST_IMAGE_SLOT, &empty);
            self.files = Files::default();
        }
        Ok(())
    }

    fn collect_slow(&mut self) -> Result<(), FrontendError> {
        let mut done = std::mem::take(&mut self.scratch);
        self.slow.take_done(&mut done);
        for &(tag, result) in &done {
            if matches!(self.slots.get(usize::from(tag)), Some(Slot::Slow)) {
                self.slow_inflight -= 1;
                self.served_slow += 1;
                self.commit(tag, result)?;
            }
        }
        done.clear();
        self.scratch = done;
        Ok(())
    }

    /// A request arrived on `tag`.
    fn start(&mut self, tag: u16) -> Result<(), FrontendError> {
        let decoded = self
            .descs
            .get(tag)
            .ok_or(-libc::EINVAL)
            .and_then(|d| request::decode(&d, self.q.max_io_bytes));
        let req = match decoded {
            Ok(req) => req,
            Err(errno) => return self.commit(tag, errno),
        };
        let (kind, bytes) = req.accounting();
        // Tokens first, in arrival order. A request the I/O limits delay
        // waits on its direction's lane thread; the ring goes on
        // completing others, and the other direction goes on too.
        if let Some(due) = self.disk.take_tokens(kind, bytes) {
            return self.send_slow(tag, req, None, Some(due));
        }
        let ticket = match self.disk.try_admit_taken(kind, bytes) {
            Admission::Now(t) => t,
            Admission::Held => return self.send_slow(tag, req, None, None),
            Admission::Closed => return self.commit(tag, -libc::EIO),
        };
        match self.plan(&ticket, &req) {
            Some(plan) => self.submit_direct(tag, req, ticket, plan),
            None => self.send_slow(tag, req, Some(ticket), None),
        }
    }

    fn send_slow(
        &mut self,
        tag: u16,
        req: Request,
        ticket: Option<Ticket<'d>>,
        due: Option<std::time::Instant>,
    ) -> Result<(), FrontendError> {
        let len = match req {
            Request::Read { len, .. } | Request::Write { len, .. } => len,
            _ => 0,
        };
        let Some(buf) = self.bufs.region(tag, len) else {
            return self.commit(tag, -libc::EINVAL);
        };
        self.slots[usize::from(tag)] = Slot::Slow;
        self.slow_inflight += 1;
        self.slow.submit(Job {
            tag,
            req,
            buf,
            ticket,
            due,
        });
        Ok(())
    }
}

/// Closes the slow path when the queue loop ends, also by panic, so that
/// its threads end and the scope around them can be left.
struct CloseOnDrop<'a, 'd>(&'a SlowPath<'d>);

impl Drop for CloseOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Serve one queue until every tag is aborted or `stop` is set. Reports
/// on `ready` once all tags are fetched (or why they could not be).
pub fn run(
    char_fd: BorrowedFd<'_>,
    q: QueueParams,
    disk: &Disk,
    stop: &AtomicBool,
    ready: Sender<Result<(), FrontendError>>,
) -> Result<(), FrontendError> {
    let setup = (|| {
        let descs = DescArray::map(char_fd, q.q_id, q.depth)
            .map_err(io("mmap the ublk descriptor array"))?;
        let bufs =
            IoBuffers::new(q.depth, q.max_io_bytes).map_err(io("allocate ublk request buffers"))?;
        let slow = SlowPath::new().map_err(io("eventfd for the ublk slow path"))?;
        let ring = restricted_ring(char_fd, slow.wake_fd(), q.depth)?;
        Ok((descs, bufs, slow, ring))
    })();
    let (descs, bufs, slow, ring) = match setup {
        Ok(s) => s,
        Err(e) => return not_started(q, ready, e),
    };
    // Leaked (never unmapped) unless the loop ends with nothing in flight:
    // the kernel may still write into them otherwise (see the end).
    let mut bufs = ManuallyDrop::new(bufs);
    let mut wake_buf = ManuallyDrop::new(Box::new(0u64));
    let (result, quiet) = std::thread::scope(|s| {
        let _close = CloseOnDrop(&slow);
        for i in 0..SLOW_THREADS {
            let spawned = std::thread::Builder::new()
                .name(format!("ublk-q{}-slow{i}", q.q_id))
                .stack_size(SLOW_STACK)
                .spawn_scoped(s, || slow.serve(disk));
            if let Err(e) = spawned {
                let e = io("spawn a ublk slow-path thread")(e);
                return (not_started(q, ready, e), true);
            }
        }
        for lane in 0..PACED_THREADS {
            let spawned = std::thread::Builder::new()
                .name(format!("ublk-q{}-paced{lane}", q.q_id))
                .stack_size(SLOW_STACK)
                .spawn_scoped(s, {
                    let slow = &slow;
                    move || slow.serve_paced(disk, lane)
                });
            if let Err(e) = spawned {
                let e = io("spawn a ublk paced-lane thread")(e);
                return (not_started(q, ready, e), true);
            }
        }
        let mut queue = Queue {
            q,
            disk,
            stop,
            ring,
            descs: &descs,
            bufs: &mut bufs,
            slow: &slow,
            slots: (0..q.depth).map(|_| Slot::Idle).collect(),
            files: Files::default(),
            wake_buf: &mut wake_buf,
            live: usize::from(q.depth),
            direct_inflight: 0,
            slow_inflight: 0,
            scratch: Vec::new(),
            served_direct: 0,
            served_slow: 0,
            commits_queued: false,
        };
        let early = match fetch_all(&mut queue) {
            Ok(early) => {
                let _ = ready.send(Ok(()));
                early
            }
            // FETCHes may be pending in the driver: keep the buffers.
            Err(e) => return (not_started(q, ready, e), false),
        };
        let result = queue.serve(early);
        tracing::info!(
            frontend = "ublk",
            queue = q.q_id,
            on_ring = queue.served_direct,
            through_engine = queue.served_slow,
            "ublk queue {}: {} requests served on the ring, {} through the engine",
            q.q_id,
            queue.served_direct,
            queue.served_slow
        );
        // Nothing of ours in the kernel any more when every tag came back
        // aborted and no image I/O is pending on the ring.
        let quiet = queue.live == 0 && queue.direct_inflight == 0;
        drop(queue); // the ring goes; then the slow path closes and drains
        (result, quiet)
    });
    if quiet {
        drop(ManuallyDrop::into_inner(bufs));
        drop(ManuallyDrop::into_inner(wake_buf));
    }
    // Otherwise the driver still holds fetches pointing into the buffers,
    // or reads may still land in them, and both are cancelled only
    // asynchronously after the ring is gone; if the memory were unmapped
    // and reused, request data could land in unrelated memory. Leak it.
    result
}

fn not_started(
    q: QueueParams,
    ready: Sender<Result<(), FrontendError>>,
    e: FrontendError,
) -> Result<(), FrontendError> {
    let msg = e.to_string();
    let _ = ready.send(Err(e));
    Err(FrontendError::Protocol(format!(
        "queue {} not started: {msg}",
        q.q_id
    )))
}

/// FETCH_REQ for every tag. A refused FETCH completes at once; a good one
/// stays pending. Returns completions that arrived meanwhile.
fn fetch_all(queue: &mut Queue<'_, '_>) -> Result<Vec<(u64, i32)>, FrontendError> {
    for tag in 0..queue.q.depth {
        let sqe = queue_cmd(UBLK_U_IO_FETCH_REQ, &queue.q, tag, 0, queue.bufs.addr(tag));
        // SAFETY: the command points at the tag's buffer (see `run`).
        unsafe { push(&mut queue.ring, &sqe) }?;
    }
    queue
        .ring
        .submit()
        .map_err(io("io_uring_enter (ublk FETCH_REQ)"))?;
    let early: Vec<(u64, i32)> = queue
        .ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    if let Some(&(_, res)) = early.iter().find(|(_, res)| *res < 0) {
        return Err(FrontendError::Io {
            step: "ublk FETCH_REQ",
            source: std::io::Error::from_raw_os_error(-res),
        });
    }
    Ok(early)
}
