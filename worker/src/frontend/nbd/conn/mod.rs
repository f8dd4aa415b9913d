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
use super::sizing::{Sizing, IO_STACK, READ_BUFFER};
use super::sock::Sock;
use crate::disk::{Disk, IoKind};
use crate::io::BufPool;
use std::io::{self, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

mod execute;
mod reply;

use execute::*;
use reply::*;

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
