//! A connection's outgoing side: replies queued in the outbox and sent in
//! batches by whichever thread finds nobody sending, or by the writer
//! thread once the socket buffer is full (see the module above).

use super::lock;
use crate::disk::Disk;
use crate::frontend::nbd::pool::{Budget, BudgetGuard};
use crate::frontend::nbd::proto::*;
use crate::frontend::nbd::sizing::CONN_STACK;
use crate::frontend::nbd::sock::Sock;
use crate::io::{AlignedBuf, BufPool};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A reply waiting to be (fully) sent, holding the request's slot and
/// byte budget until then.
pub(super) struct Reply {
    pub(super) head: Vec<u8>,
    pub(super) data: Option<(AlignedBuf, Arc<BufPool>)>,
    pub(super) sent: usize,
    pub(super) _guards: Vec<BudgetGuard>,
}

impl Reply {
    pub(super) fn new(head: Vec<u8>, guards: Vec<BudgetGuard>) -> Reply {
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
pub(super) struct Outbox {
    pub(super) queue: VecDeque<Reply>,
    /// Some thread is sending from the queue right now: everyone else
    /// only enqueues (and the sender takes their replies along).
    pub(super) sending: bool,
    /// The socket buffer filled up: only the writer thread sends until
    /// the queue is empty again.
    pub(super) congested: bool,
    pub(super) closed: bool,
    pub(super) writer: Option<JoinHandle<()>>,
}

/// One client connection in transmission.
pub(super) struct Conn {
    pub(super) sock: Arc<Sock>,
    pub(super) session: Session,
    pub(super) outbox: Mutex<Outbox>,
    pub(super) wake_writer: Condvar,
    pub(super) slots: Arc<Budget>,
    /// This connection's share of the payload budget, so that one client
    /// that stops reading cannot hold all of it.
    pub(super) bytes: Arc<Budget>,
    /// For blktap's `kicks` counters.
    pub(super) disk: Arc<Disk>,
}

/// Replies sent in one `sendmsg` at most.
pub(super) const MAX_BATCH: usize = 64;

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
    pub(super) fn hang_up(&self, ob: &mut Outbox) {
        ob.closed = true;
        ob.queue.clear();
        self.sock.shutdown();
        self.wake_writer.notify_all();
    }

    /// Queue a reply and, unless another thread is at it, send everything
    /// queued (see module doc).
    pub(super) fn send(self: &Arc<Self>, reply: Reply) {
        self.send_all(std::iter::once(reply));
    }

    /// [`Conn::send`] for several replies at once.
    pub(super) fn send_all(self: &Arc<Self>, replies: impl IntoIterator<Item = Reply>) {
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
    pub(super) fn writer(&self) {
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

    pub(super) fn error_reply(
        &self,
        handle: u64,
        error: u32,
        msg: &str,
        guards: Vec<BudgetGuard>,
    ) -> Reply {
        let head = if self.session.structured {
            error_chunk(handle, error, msg)
        } else {
            simple_reply(error, handle).to_vec()
        };
        Reply::new(head, guards)
    }
}
