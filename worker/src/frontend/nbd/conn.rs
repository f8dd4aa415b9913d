//! The transmission phase of one connection.
//!
//! Three roles per connection:
//! - the *reader* (the connection's own thread) parses request headers,
//!   checks them ([`decide`]), reads write payloads, and queues the work on
//!   the shared pool — it never waits for the disk, so many requests of one
//!   connection are in flight at once (bounded by [`MAX_INFLIGHT`]);
//! - *pool threads* run a request against the disk and send its reply with a
//!   non-blocking `sendmsg`; if the client is not reading fast enough, the
//!   rest of the reply goes to the connection's outbox instead of blocking
//!   the pool thread (a client that stops reading must not stall others);
//! - the *writer* thread, started the first time a reply does not fit in
//!   the socket buffer, drains the outbox with blocking sends bounded by
//!   [`SEND_TIMEOUT`]; a client that does not read for that long is dropped.
//!
//! Replies may leave in any order (NBD allows it); bytes of two replies never
//! interleave because sending happens under the outbox lock, directly only
//! while the outbox is empty and the writer idle.

use super::pool::{Budget, BudgetGuard, WorkPool};
use super::proto::*;
use super::sizing::{Sizing, CONN_STACK, IO_STACK};
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
/// Buffered reading of request headers and small payloads.
const READ_BUFFER: usize = 128 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every connection of one export shares.
#[derive(Debug)]
pub struct ServerCtx {
    pub disk: Arc<Disk>,
    pub sizing: Sizing,
    pub pool: WorkPool,
    pub bufs: Arc<BufPool>,
    pub bytes: Arc<Budget>,
}

impl ServerCtx {
    pub fn new(disk: Arc<Disk>, sizing: Sizing) -> io::Result<ServerCtx> {
        Ok(ServerCtx {
            disk,
            sizing,
            pool: WorkPool::start(sizing.io_threads, IO_STACK, "nbd-io")?,
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
    writer_busy: bool,
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
}

/// Send what `reply` has left; `Ok(true)` when all is sent, `Ok(false)`
/// when a non-blocking send could not finish.
fn push_out(sock: &Sock, reply: &mut Reply, nonblocking: bool) -> io::Result<bool> {
    while reply.sent < reply.total() {
        match sock.send_vectored(&reply.remaining(), nonblocking) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => reply.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl Conn {
    fn hang_up(&self, ob: &mut Outbox) {
        ob.closed = true;
        ob.queue.clear();
        self.sock.shutdown();
        self.wake_writer.notify_all();
    }

    /// Queue or send a reply (see module doc).
    fn send(self: &Arc<Self>, mut reply: Reply) {
        let mut ob = lock(&self.outbox);
        if ob.closed {
            return;
        }
        if !ob.writer_busy && ob.queue.is_empty() {
            match push_out(&self.sock, &mut reply, true) {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => return self.hang_up(&mut ob),
            }
        }
        if ob.writer.is_none() {
            let c = self.clone();
            match crate::frontend::spawn_thread_sized("nbd-tx", CONN_STACK, move || c.writer()) {
                Ok(t) => ob.writer = Some(t),
                Err(_) => return self.hang_up(&mut ob),
            }
        }
        ob.queue.push_back(reply);
        drop(ob);
        self.wake_writer.notify_one();
    }

    fn writer(&self) {
        let mut ob = lock(&self.outbox);
        loop {
            let Some(mut reply) = ob.queue.pop_front() else {
                if ob.closed {
                    return;
                }
                ob = self.wake_writer.wait(ob).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            ob.writer_busy = true;
            drop(ob);
            let r = push_out(&self.sock, &mut reply, false);
            drop(reply);
            ob = lock(&self.outbox);
            ob.writer_busy = false;
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
    });
    let end = read_loop(&conn, &ctx);
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

fn read_loop(conn: &Arc<Conn>, ctx: &Arc<ServerCtx>) -> End {
    let mut rd = BufReader::with_capacity(READ_BUFFER, &*conn.sock);
    loop {
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
                if let Err(e) = io::copy(&mut (&mut rd).take(u64::from(skip)), &mut io::sink()) {
                    return End::HungUp(format!("skipping a rejected payload: {e}"));
                }
                let slot = conn.slots.acquire(1);
                conn.send(conn.error_reply(req.handle, error, reject_reason(error), vec![slot]));
            }
            Decision::Run(cmd) => {
                let slot = conn.slots.acquire(1);
                let payload = match cmd {
                    Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
                    _ => 0,
                };
                let bytes = ctx.bytes.acquire(payload);
                let data = if let Command::Write { len, .. } = cmd {
                    let mut buf = ctx.bufs.get(len as usize);
                    if let Err(e) = rd.read_exact(&mut buf) {
                        return End::HungUp(format!("reading a write payload: {e}"));
                    }
                    Some(buf)
                } else {
                    None
                };
                let (conn, ctx2) = (conn.clone(), ctx.clone());
                ctx.pool.submit(Box::new(move || {
                    execute(&conn, &ctx2, req.handle, cmd, data, vec![slot, bytes]);
                }));
            }
        }
    }
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
            match disk.io(IoKind::Read, len.into(), |img| {
                img.read_at(&mut buf, offset)
            }) {
                Err(e) => {
                    ctx.bufs.put(buf);
                    disk_error(conn, handle, &e, guards)
                }
                Ok(()) if len == 0 && conn.session.structured => {
                    ctx.bufs.put(buf);
                    Reply::new(none_chunk(handle).to_vec(), guards)
                }
                Ok(()) => {
                    let head = if conn.session.structured {
                        offset_data_header(handle, offset, len).to_vec()
                    } else {
                        simple_reply(0, handle).to_vec()
                    };
                    let mut r = Reply::new(head, guards);
                    r.data = Some((buf, ctx.bufs.clone()));
                    r
                }
            }
        }
        Command::Write { offset, len, fua } => {
            let Some(buf) = data else {
                return; // unreachable by construction: the reader fills writes
            };
            let r = disk.io(IoKind::Write, len.into(), |img| {
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
        Command::Flush => match disk.io(IoKind::Other, 0, |img| img.flush()) {
            Ok(()) => ok(guards),
            Err(e) => disk_error(conn, handle, &e, guards),
        },
        Command::Trim { offset, len, fua } => {
            let r = disk.io(IoKind::Other, 0, |img| {
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
        } => match disk.io(IoKind::Other, 0, |img| extents(img, offset, len, req_one)) {
            Ok(ext) => Reply::new(
                block_status_chunk(handle, META_BASE_ALLOCATION_ID, &ext),
                guards,
            ),
            Err(e) => disk_error(conn, handle, &e, guards),
        },
    };
    conn.send(reply);
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
