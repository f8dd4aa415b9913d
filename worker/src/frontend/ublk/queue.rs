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
use crate::image::{DirectFile, Mapping, SyncFiles, Target};
use crate::io::ring::Uring;
use io_uring::{opcode, squeue, types};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;
use tapjail_common::ublk_abi::*;

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

    /// Whether (and how) the request can be served on the ring.
    fn plan(&mut self, ticket: &Ticket<'d>, req: &Request) -> Option<Plan> {
        let img = ticket.image();
        match *req {
            Request::Read { offset, len } | Request::Write { offset, len, .. } => {
                let write = matches!(req, Request::Write { .. });
                let m = img.map_direct(offset, len as u64, write)?;
                let files = self.files_for(ticket)?;
                let fits = m.segments().iter().all(|s| match s.target {
                    Target::Zero => true,
                    Target::File { file, offset } => files.get(file).is_some_and(|f| {
                        // Tag buffers are page aligned and pieces whole
                        // sectors; check rather than trust.
                        !f.o_direct || (offset | s.len) & 511 == 0
                    }),
                });
                fits.then_some(Plan::Rw(m))
            }
            Request::Flush => {
                let sync = img.direct_sync()?;
                if sync.0 != 0 {
                    let n = self.files_for(ticket)?.len();
                    if sync.iter().any(|i| i >= n) {
                        return None;
                    }
                }
                Some(Plan::Sync(sync))
            }
            _ => None,
        }
    }

    /// The image files of the ticket's image, registered in the ring
    /// (`None`: it has none, or they could not be registered).
    fn files_for(&mut self, ticket: &Ticket<'d>) -> Option<&[DirectFile]> {
        let generation = ticket.generation();
        if self.files.generation != Some(generation) {
            // A new generation exists only after a pause drained every
            // request of the previous image, so no I/O of ours is still
            // using the slots we replace (and in-flight I/O holds its own
            // reference to its file anyway).
            let mut files = ticket.image().direct_files();
            let mut fds = [-1; MAX_DIRECT_FILES];
            if files.len() > MAX_DIRECT_FILES {
                files.clear();
            }
            for (slot, f) in fds.iter_mut().zip(&files) {
                *slot = f.fd;
            }
            if let Err(e) = self
                .ring
                .submitter()
                .register_files_update(FIRST_IMAGE_SLOT, &fds)
            {
                tracing::warn!(
                    frontend = "ublk",
                    queue = self.q.q_id,
                    "ublk queue {}: image files not registered with the ring ({e}); serving through the engine",
                    self.q.q_id
                );
                files.clear();
            }
            self.files = Files {
                generation: Some(generation),
                files,
            };
        }
        (!self.files.files.is_empty()).then_some(&self.files.files[..])
    }

    fn submit_direct(
        &mut self,
        tag: u16,
        req: Request,
        ticket: Ticket<'d>,
        plan: Plan,
    ) -> Result<(), FrontendError> {
        let mut d = Direct {
            ticket,
            req,
            mapping: None,
            pending: 0,
            done: [0; MAX_SEGMENTS],
            error: None,
        };
        match plan {
            Plan::Rw(m) => {
                let fua = matches!(req, Request::Write { fua: true, .. });
                let mut at = 0usize;
                for (piece, seg) in m.segments().iter().enumerate() {
                    let len = seg.len as usize;
                    match seg.target {
                        Target::Zero => {
                            if let Some(b) = self.bufs.get_mut(tag, at + len) {
                                b[at..].fill(0);
                            }
                        }
                        Target::File { file, offset } => {
                            let f = self.files.files[file];
                            if m.is_write() && !f.o_direct && !fua {
                                let Some(b) = self.bufs.get_mut(tag, at + len) else {
                                    d.error.get_or_insert(-libc::EINVAL);
                                    break;
                                };
                                if let Err(e) = pwrite_all(f.fd, &b[at..], offset) {
                                    d.error
                                        .get_or_insert(-e.raw_os_error().unwrap_or(libc::EIO));
                                    break;
                                }
                                d.done[piece] = seg.len;
                            } else {
                                self.push_rw(tag, piece, file, m.is_write(), fua, at, len, offset)?;
                                d.pending += 1;
                            }
                        }
                    }
                    at += len;
                }
                d.mapping = Some(m);
            }
            Plan::Sync(files) => {
                for (piece, file) in files.iter().enumerate() {
                    let sqe = opcode::Fsync::new(image_slot(file))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(user_data(KIND_IO, tag, piece));
                    // SAFETY: fsync points at no memory.
                    unsafe { push(&mut self.ring, &sqe) }?;
                    d.pending += 1;
                }
            }
        }
        if d.pending == 0 {
            return self.finish(tag, d);
        }
        self.slots[usize::from(tag)] = Slot::Direct(d);
        self.direct_inflight += 1;
        Ok(())
    }

    /// Queue a READ or WRITE of `len` bytes of the tag's buffer from `at`.
    #[allow(clippy::too_many_arguments)]
    fn push_rw(
        &mut self,
        tag: u16,
        piece: usize,
        file: usize,
        write: bool,
        fua: bool,
        at: usize,
        len: usize,
        offset: u64,
    ) -> Result<(), FrontendError> {
        let addr = (self.bufs.addr(tag) as usize + at) as *mut u8;
        let len = u32::try_from(len)
            .map_err(|_| FrontendError::Protocol(format!("ublk request piece of {len} bytes")))?;
        let ud = user_data(KIND_IO, tag, piece);
        let sqe = if write {
            opcode::Write::new(image_slot(file), addr, len)
                .offset(offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build()
        } else {
            opcode::Read::new(image_slot(file), addr, len)
                .offset(offset)
                .build()
        };
        // SAFETY: the range lies inside the tag's buffer (pieces add up to
        // the request, which fits the buffer), owned by this queue until
        // the commit, and the buffers outlive the ring (see `run`).
        unsafe { push(&mut self.ring, &sqe.user_data(ud)) }
    }

    fn on_image_io(&mut self, tag: u16, piece: usize, res: i32) -> Result<(), FrontendError> {
        let Some(Slot::Direct(d)) = self.slots.get_mut(usize::from(tag)) else {
            return Ok(()); // not ours: nothing to do
        };
        if res < 0 {
            d.error.get_or_insert(res);
        } else if let Some(m) = &d.mapping {
            let seg = m.segments()[piece.min(m.segments().len() - 1)];
            let got = u64::try_from(res).unwrap_or(0);
            d.done[piece] += got;
            if got == 0 {
                // End of file inside a mapped range: the image is broken.
                d.error.get_or_insert(-libc::EIO);
            } else if d.done[piece] < seg.len {
                // Short transfer: queue the rest.
                let Target::File { file, offset } = seg.target else {
                    return Ok(());
                };
                let at = m.segments()[..piece].iter().map(|s| s.len).sum::<u64>() + d.done[piece];
                let fua = matches!(d.req, Request::Write { fua: true, .. });
                let write = m.is_write();
                let left = (seg.len - d.done[piece]) as usize;
                let off = offset + d.done[piece];
                return self.push_rw(tag, piece, file, write, fua, at as usize, left, off);
            }
        }
        d.pending -= 1;
        if d.pending > 0 {
            return Ok(());
        }
        let Slot::Direct(d) = std::mem::replace(&mut self.slots[usize::from(tag)], Slot::Idle)
        else {
            return Ok(());
        };
        self.direct_inflight -= 1;
        self.finish(tag, d)
    }

    /// Every piece is done: account, release the ticket, commit.
    fn finish(&mut self, tag: u16, d: Direct<'d>) -> Result<(), FrontendError> {
        let Direct {
            ticket,
            req,
            mapping,
            error,
            ..
        } = d;
        let ok = error.is_none();
        self.served_direct += 1;
        if let Some(m) = &mapping {
            ticket.image().direct_done(m, ok);
        }
        drop(mapping); // unpin before the ticket lets a pause proceed
        let (kind, bytes) = req.accounting();
        ticket.finish(kind, bytes, ok);
        let result = match error {
            None => req.done_value(),
            Some(e) => e.min(-1),
        };
        self.commit(tag, result)
    }
}

fn image_slot(file: usize) -> types::Fixed {
    types::Fixed(FIRST_IMAGE_SLOT + file as u32)
}

/// `pwrite` until done (a buffered write to a regular file).
fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let off =
            i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: buf is valid for reads of its length for the call; fd is
        // an image file the image keeps open while its ticket lives.
        let n = unsafe { libc::pwrite64(fd, buf.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
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
