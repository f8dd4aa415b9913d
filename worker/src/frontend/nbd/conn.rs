//! The transmission phase of one connection.
//!
//! Three roles per connection:
//! - the *reader* (the connection's own thread) parses request headers,
//!   checks them ([`decide`]), reads write payloads, and queues the work on
//!   the shared pool — it never waits for the disk, so many requests of one
//!   connection are in flight at once (bounded by [`MAX_INFLIGHT`]);
//! - *pool threads* run a request against the disk and queue its reply in
//!   the connection's outbox; the first one to find nobody sending becomes
//!   the sender and sends everything queued, its own reply and those that
//!   other threads queue meanwhile, in as few non-blocking `sendmsg` calls
//!   as possible (one per batch), while the others go back to work;
//! - the *writer* thread, started the first time the socket buffer fills
//!   up, takes over sending with blocking sends bounded by
//!   [`SEND_TIMEOUT`] until the outbox is empty; a client that does not
//!   read for that long is dropped. A client that stops reading thus never
//!   stalls a pool thread, and so never stalls other clients.
//!
//! Small reads are first tried on the reader itself, without waiting
//! ([`Disk::try_io`] / `Image::read_at_nowait`: metadata in memory, data
//! in the page cache). A hit is answered right there, with no handoff to a
//! pool thread (two futex calls and two context switches saved per
//! request), and its reply is held back until the reader has parsed every
//! request already received, then sent with the others in one `sendmsg`.
//! A miss goes to the pool as any other request; after a run of misses
//! (direct I/O, a cold cache) the reader stops trying for a while.
//!
//! Replies may leave in any order (NBD allows it); bytes of two replies
//! never interleave because only one thread sends at a time and a partly
//! sent reply stays at the head of the outbox.

use super::pool::{Budget, BudgetGuard, WorkPool};
use super::proto::*;
use super::sizing::{Sizing, CONN_STACK, IO_STACK, READ_BUFFER};
use super::sock::Sock;
use crate::disk::{Disk, DiskError, IoKind};
use crate::io::{AlignedBuf, BufPool};
use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Requests of one connection in flight at once.
pub const MAX_INFLIGHT: u64 = 64;
/// A client that does not take a reply for this long is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Reads up to this size are tried on the reader thread first.
const INLINE_MAX: u32 = 128 * 1024;
/// After this many inline misses in a row, stop trying for a while...
const INLINE_GIVE_UP: u32 = 8;
/// ...for this many read requests.
const INLINE_BACKOFF: u32 = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every connection of one export shares.
#[derive(Debug)]
pub struct ServerCtx {
    pub disk: Arc<Disk>,
    pub sizing: Sizing,
    pub pool: WorkPool,
    /// One thread per direction ([read, write]) for requests the I/O
    /// limits delay: each waits there for its slot, in arrival order, so
    /// a direction out of tokens holds up only itself, never the shared
    /// pool and so never the other direction (writes out of tokens do
    /// not hold reads queued behind them, nor the other way round).
    pub paced: [WorkPool; 2],
    pub bufs: Arc<BufPool>,
    pub bytes: Arc<Budget>,
}

impl ServerCtx {
    pub fn new(disk: Arc<Disk>, sizing: Sizing) -> io::Result<ServerCtx> {
        Ok(ServerCtx {
            disk,
            sizing,
            pool: WorkPool::start(sizing.io_threads, IO_STACK, "nbd-io")?,
            paced: [
                WorkPool::start(1, IO_STACK, "nbd-paced-r")?,
                WorkPool::start(1, IO_STACK, "nbd-paced-w")?,
            ],
            bufs: Arc::new(BufPool::new(sizing.idle_bytes)),
            bytes: Budget::new(sizing.inflight_bytes),
        })
    }
}

/// A reply waiting to be (fully) sent, holding the request's slot and
/// byte budget until then.
struct Reply {
    head: Vec<u8>,
    data: Option<(AlignedBuf, Arc<BufPool>)>,
    sent: usize,
    _guards: Vec<BudgetGuard>,
}

impl Reply {
    fn new(head: Vec<u8>, guards: Vec<BudgetGuard>) -> Reply {
        Reply {
            head,
            data: None,
            sent: 0,
            _guards: guards,
        }
    }

    fn total(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |(d, _)| d.len())
    }

    /// The unsent bytes, as at most two slices.
    fn remaining(&self) -> [IoSlice<'_>; 2] {
        let data: &[u8] = self.data.as_ref().map_or(&[], |(d, _)| d);
        if self.sent < self.head.len() {
            [IoSlice::new(&self.head[self.sent..]), IoSlice::new(data)]
        } else {
            [
                IoSlice::new(&data[self.sent - self.head.len()..]),
                IoSlice::new(&[]),
            ]
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some((buf, pool)) = self.data.take() {
            pool.put(buf);
        }
    }
}

#[derive(Default)]
struct Outbox {
    queue: VecDeque<Reply>,
    /// Some thread is sending from the queue right now: everyone else
    /// only enqueues (and the sender takes their replies along).
    sending: bool,
    /// The socket buffer filled up: only the writer thread sends until
    /// the queue is empty again.
    congested: bool,
    closed: bool,
    writer: Option<JoinHandle<()>>,
}

/// One client connection in transmission.
struct Conn {
    sock: Arc<Sock>,
    session: Session,
    outbox: Mutex<Outbox>,
    wake_writer: Condvar,
    slots: Arc<Budget>,
    /// This connection's share of the payload budget, so that one client
    /// that stops reading cannot hold all of it.
    bytes: Arc<Budget>,
    /// For blktap's `kicks` counters.
    disk: Arc<Disk>,
}

/// Replies sent in one `sendmsg` at most.
const MAX_BATCH: usize = 64;

/// Send `batch` in order with as few `sendmsg` calls as possible; fully
/// sent replies are removed (and dropped, releasing their budgets). With
/// `nonblocking`, stops when the socket is full; what is left stays in
/// `batch`, the partly sent reply first.
fn send_batch(
    sock: &Sock,
    disk: &Disk,
    batch: &mut VecDeque<Reply>,
    nonblocking: bool,
) -> io::Result<()> {
    while !batch.is_empty() {
        let iov: Vec<IoSlice<'_>> = batch
            .iter()
            .flat_map(|r| r.remaining())
            .filter(|s| !s.is_empty())
            .collect();
        let mut n = match sock.send_vectored(&iov, nonblocking) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                disk.counters.kick_out();
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => return Ok(()),
            Err(e) => return Err(e),
        };
        drop(iov);
        while n > 0 {
            let Some(front) = batch.front_mut() else {
                break;
            };
            let left = front.total() - front.sent;
            if n >= left {
                n -= left;
                batch.pop_front();
            } else {
                front.sent += n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl Conn {
    fn hang_up(&self, ob: &mut Outbox) {
        ob.closed = true;
        ob.queue.clear();
        self.sock.shutdown();
        self.wake_writer.notify_all();
    }

    /// Queue a reply and, unless another thread is at it, send everything
    /// queued (see module doc).
    fn send(self: &Arc<Self>, reply: Reply) {
        self.send_all(std::iter::once(reply));
    }

    /// [`Conn::send`] for several replies at once.
    fn send_all(self: &Arc<Self>, replies: impl IntoIterator<Item = Reply>) {
        let mut ob = lock(&self.outbox);
        if ob.closed {
            return;
        }
        ob.queue.extend(replies);
        if ob.queue.is_empty() || ob.sending || ob.congested {
            return;
        }
        ob.sending = true;
        loop {
            let take = ob.queue.len().min(MAX_BATCH);
            let mut batch: VecDeque<Reply> = ob.queue.drain(..take).collect();
            drop(ob);
            let r = send_batch(&self.sock, &self.disk, &mut batch, true);
            let unsent = !batch.is_empty();
            ob = lock(&self.outbox);
            if r.is_err() {
                ob.sending = false;
                drop(batch);
                return self.hang_up(&mut ob);
            }
            if unsent {
                // Socket full: hand everything to the writer thread.
                for r in batch.into_iter().rev() {
                    ob.queue.push_front(r);
                }
                ob.sending = false;
                ob.congested = true;
                if ob.writer.is_none() {
                    let c = self.clone();
                    match crate::frontend::spawn_thread_sized("nbd-tx", CONN_STACK, move || {
                        c.writer()
                    }) {
                        Ok(t) => ob.writer = Some(t),
                        Err(_) => return self.hang_up(&mut ob),
                    }
                }
                drop(ob);
                self.wake_writer.notify_one();
                return;
            }
            if ob.queue.is_empty() || ob.closed {
                ob.sending = false;
                return;
            }
        }
    }

    /// Drain the queue with blocking sends while the client is slow.
    fn writer(&self) {
        let mut ob = lock(&self.outbox);
        loop {
            if ob.closed {
                return;
            }
            if !ob.congested || ob.sending {
                ob = self.wake_writer.wait(ob).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if ob.queue.is_empty() {
                ob.congested = false;
                continue;
            }
            ob.sending = true;
            let take = ob.queue.len().min(MAX_BATCH);
            let mut batch: VecDeque<Reply> = ob.queue.drain(..take).collect();
            drop(ob);
            // Bounded by SO_SNDTIMEO: a client that stops reading is dropped.
            let r = send_batch(&self.sock, &self.disk, &mut batch, false);
            drop(batch);
            ob = lock(&self.outbox);
            ob.sending = false;
            if r.is_err() {
                self.hang_up(&mut ob);
                return;
            }
        }
    }

    fn error_reply(&self, handle: u64, error: u32, msg: &str, guards: Vec<BudgetGuard>) -> Reply {
        let head = if self.session.structured {
            error_chunk(handle, error, msg)
        } else {
            simple_reply(error, handle).to_vec()
        };
        Reply::new(head, guards)
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// NBD_CMD_DISC, or the client closed its end.
    Clean,
    /// We hung up: protocol violation or I/O error.
    HungUp(String),
}

/// Serve one negotiated connection until it ends; every request it sent is
/// answered (or dropped with the connection) before this returns.
pub fn serve(sock: Arc<Sock>, session: Session, ctx: Arc<ServerCtx>) -> io::Result<End> {
    let conn = Arc::new(Conn {
        sock,
        session,
        outbox: Mutex::new(Outbox::default()),
        wake_writer: Condvar::new(),
        slots: Budget::new(MAX_INFLIGHT),
        bytes: Budget::new((ctx.sizing.inflight_bytes / 4).max(u64::from(ctx.sizing.max_payload))),
        disk: ctx.disk.clone(),
    });
    let mut inline = Inline::default();
    let end = read_loop(&conn, &ctx, &mut inline);
    // Replies to requests answered on the reader that are still held back.
    inline.flush(&conn);
    if matches!(end, End::HungUp(_)) {
        conn.hang_up(&mut lock(&conn.outbox));
    }
    // Every request queued so far gets answered (or dropped if hung up).
    conn.slots.wait_idle();
    let writer = {
        let mut ob = lock(&conn.outbox);
        ob.closed = true;
        conn.wake_writer.notify_all();
        ob.writer.take()
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    conn.sock.shutdown();
    Ok(end)
}

/// Requests answered on the reader thread (see module doc).
#[derive(Default)]
struct Inline {
    /// Replies held back until the reader would block.
    replies: Vec<Reply>,
    /// Inline attempts that missed in a row.
    misses: u32,
    /// Read requests left before trying again after a run of misses.
    skip: u32,
}

impl Inline {
    fn flush(&mut self, conn: &Arc<Conn>) {
        if !self.replies.is_empty() {
            conn.send_all(self.replies.drain(..));
        }
    }

    /// Whether to try the next read inline.
    fn should_try(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn missed(&mut self) {
        self.misses += 1;
        if self.misses >= INLINE_GIVE_UP {
            self.misses = 0;
            self.skip = INLINE_BACKOFF;
        }
    }
}

/// The request's slot and its payload bytes (this connection's share and
/// the server's). Tries without waiting first; before waiting, sends the
/// held-back replies, which hold budget themselves.
fn acquire(
    conn: &Arc<Conn>,
    ctx: &ServerCtx,
    payload: u64,
    inline: &mut Inline,
) -> Vec<BudgetGuard> {
    let fast = conn.slots.try_acquire(1).and_then(|slot| {
        let own = conn.bytes.try_acquire(payload)?;
        let bytes = ctx.bytes.try_acquire(payload)?;
        Some(vec![slot, own, bytes])
    });
    if let Some(guards) = fast {
        return guards;
    }
    inline.flush(conn);
    vec![
        conn.slots.acquire(1),
        conn.bytes.acquire(payload),
        ctx.bytes.acquire(payload),
    ]
}

fn read_loop(conn: &Arc<Conn>, ctx: &Arc<ServerCtx>, inline: &mut Inline) -> End {
    let mut rd = BufReader::with_capacity(READ_BUFFER, &*conn.sock);
    loop {
        if rd.buffer().len() < REQUEST_SIZE {
            // The next read may block: let the held-back replies go first.
            inline.flush(conn);
            ctx.disk.counters.kick_in();
        }
        let mut hb = [0u8; REQUEST_SIZE];
        match rd.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::Clean,
            Err(e) => return End::HungUp(format!("reading a request: {e}")),
        }
        let req = match parse_request(&hb) {
            Ok(r) => r,
            Err(e) => return End::HungUp(format!("request header: {e}")),
        };
        match decide(&req, &conn.session) {
            Decision::HangUp(why) => return End::HungUp(why.into()),
            Decision::Disconnect => return End::Clean,
            Decision::Reject { error, skip } => {
                if rd.buffer().len() < skip as usize {
                    inline.flush(conn);
                }
                if let Err(e) = io::copy(&mut (&mut rd).take(u64::from(skip)), &mut io::sink()) {
                    return End::HungUp(format!("skipping a rejected payload: {e}"));
                }
                let guards = acquire(conn, ctx, 0, inline);
                conn.send(conn.error_reply(req.handle, error, reject_reason(error), guards));
            }
            Decision::Run(cmd) => {
                let payload = match cmd {
                    Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
                    _ => 0,
                };
                let guards = acquire(conn, ctx, payload, inline);
                if let Command::Read { offset, len } = cmd {
                    if len <= INLINE_MAX && inline.should_try() {
                        let mut buf = ctx.bufs.get(len as usize);
                        let hit = ctx.disk.try_io(IoKind::Read, len.into(), |img| {
                            img.read_at_nowait(&mut buf, offset).then_some(())
                        });
                        if hit.is_some() {
                            inline.misses = 0;
                            let reply = read_reply(conn, ctx, req.handle, offset, len, buf, guards);
                            inline.replies.push(reply);
                            if inline.replies.len() >= MAX_BATCH {
                                inline.flush(conn);
                            }
                            continue;
                        }
                        inline.missed();
                        ctx.bufs.put(buf);
                    }
                }
                let data = if let Command::Write { len, .. } = cmd {
                    let mut buf = ctx.bufs.get(len as usize);
                    if rd.buffer().len() < len as usize {
                        inline.flush(conn);
                    }
                    if let Err(e) = rd.read_exact(&mut buf) {
                        return End::HungUp(format!("reading a write payload: {e}"));
                    }
                    Some(buf)
                } else {
                    None
                };
                let (conn, ctx2) = (conn.clone(), ctx.clone());
                // Tokens are taken here, in the order the client sent
                // its requests; a delayed one waits on its direction's
                // own thread.
                let (kind, lane) = match cmd {
                    Command::Read { .. } => (IoKind::Read, 0),
                    Command::Write { .. } => (IoKind::Write, 1),
                    _ => (IoKind::Other, 0),
                };
                match ctx.disk.take_tokens(kind, payload) {
                    None => ctx.pool.submit(Box::new(move || {
                        execute(&conn, &ctx2, req.handle, cmd, data, guards);
                    })),
                    Some(due) => ctx.paced[lane].submit(Box::new(move || {
                        ctx2.disk.pace_until(due);
                        execute(&conn, &ctx2, req.handle, cmd, data, guards);
                    })),
                }
            }
        }
    }
}

/// The reply to a successful read of `len` bytes into `buf`.
fn read_reply(
    conn: &Conn,
    ctx: &ServerCtx,
    handle: u64,
    offset: u64,
    len: u32,
    buf: AlignedBuf,
    guards: Vec<BudgetGuard>,
) -> Reply {
    if len == 0 && conn.session.structured {
        ctx.bufs.put(buf);
        return Reply::new(none_chunk(handle).to_vec(), guards);
    }
    let head = if conn.session.structured {
        offset_data_header(handle, offset, len).to_vec()
    } else {
        simple_reply(0, handle).to_vec()
    };
    let mut r = Reply::new(head, guards);
    r.data = Some((buf, ctx.bufs.clone()));
    r
}

fn disk_error(conn: &Conn, handle: u64, e: &DiskError, guards: Vec<BudgetGuard>) -> Reply {
    conn.error_reply(handle, nbd_error(e.errno()), &e.to_string(), guards)
}

/// Run one request on a pool thread and send its reply.
fn execute(
    conn: &Arc<Conn>,
    ctx: &ServerCtx,
    handle: u64,
    cmd: Command,
    data: Option<AlignedBuf>,
    guards: Vec<BudgetGuard>,
) {
    let disk = &ctx.disk;
    let ok = |guards| Reply::new(simple_reply(0, handle).to_vec(), guards);
    let reply = match cmd {
        Command::Read { offset, len } => {
            let mut buf = ctx.bufs.get(len as usize);
            // Its tokens were taken when it was read off the socket.
            match disk.io_taken(IoKind::Read, len.into(), |img| {
                img.read_at(&mut buf, offset)
            }) {
                Err(e) => {
                    ctx.bufs.put(buf);
                    disk_error(conn, handle, &e, guards)
                }
                Ok(()) => read_reply(conn, ctx, handle, offset, len, buf, guards),
            }
        }
        Command::Write { offset, len, fua } => {
            let Some(buf) = data else {
                return; // unreachable by construction: the reader fills writes
            };
            let r = disk.io_taken(IoKind::Write, len.into(), |img| {
                img.write_at(&buf, offset)?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            ctx.bufs.put(buf);
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::Flush => match disk.io(IoKind::Flush, 0, |img| img.flush()) {
            Ok(()) => ok(guards),
            Err(e) => disk_error(conn, handle, &e, guards),
        },
        Command::Trim { offset, len, fua } => {
            let r = disk.io(IoKind::Discard, 0, |img| {
                img.discard(offset, len.into())?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap,
        } => {
            let r = disk.io(IoKind::Other, 0, |img| {
                img.write_zeroes(offset, len.into(), may_unmap)?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let session = conn.session;
            let dirty = session.dirty_bitmap.map(|id| {
                disk.cbt()
                    .and_then(|t| t.by_id(id))
                    .map(|m| dirty_extents(&m, offset, len, req_one))
            });
            let base = session
                .base_allocation
                .then(|| disk.io(IoKind::Other, 0, |img| extents(img, offset, len, req_one)))
                .transpose();
            match (base, dirty) {
                (Err(e), _) => disk_error(conn, handle, &e, guards),
                (Ok(_), Some(None)) => Reply::new(
                    error_chunk(
                        handle,
                        NBD_EINVAL,
                        "the dirty bitmap this connection selected was stopped",
                    ),
                    guards,
                ),
                (Ok(base), dirty) => {
                    let dirty = dirty.flatten();
                    let mut b = Vec::new();
                    if let Some(ext) = &base {
                        b.extend(block_status_chunk_of(
                            handle,
                            META_BASE_ALLOCATION_ID,
                            ext,
                            dirty.is_none(),
                        ));
                    }
                    if let Some(ext) = &dirty {
                        b.extend(block_status_chunk_of(
                            handle,
                            META_DIRTY_BITMAP_ID,
                            ext,
                            true,
                        ));
                    }
                    Reply::new(b, guards)
                }
            }
        }
    };
    conn.send(reply);
}

/// `qemu:dirty-bitmap:NAME` descriptors for `[offset, offset+len)`
/// (flag [`STATE_DIRTY`] for written blocks, as qemu), merged, at most
/// [`MAX_EXTENTS`] (or one with `req_one`).
fn dirty_extents(
    map: &crate::cbt::Bitmap,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len); // checked by `decide`
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while let Some((l, dirty)) = map.extent(pos, end - pos) {
        let flags = if dirty { STATE_DIRTY } else { 0 };
        let l32 = u32::try_from(l).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += l32,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l32, flags));
            }
        }
        pos += l;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

/// `base:allocation` descriptors for `[offset, offset+len)`, merged, at
/// most [`MAX_EXTENTS`] (or one with `req_one`); they may cover less than
/// asked, as the protocol allows.
fn extents(
    img: &dyn crate::image::Image,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, crate::image::ImageError> {
    let end = offset + u64::from(len); // checked by `decide`
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let e = img.block_status(pos, end - pos)?;
        if e.len == 0 {
            break;
        }
        let l = e.len.min(end - pos);
        let flags = if e.allocated { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
        // l ≤ len, which is a u32.
        let l32 = u32::try_from(l).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += l32,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l32, flags));
            }
        }
        pos += l;
    }
    if out.is_empty() {
        out.push((len, 0)); // "unknown" is always a valid answer
    }
    Ok(out)
}
