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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
                ob.sending = false;
                if self.requeue_for_writer(&mut ob, batch) {
                    drop(ob);
                    self.wake_writer.notify_one();
                }
                return;
            }
            if ob.queue.is_empty() || ob.closed {
                ob.sending = false;
                return;
            }
        }
    }

    /// The socket took only part of `batch`: put the rest back at the head
    /// of the queue and hand sending to the writer thread (started on
    /// first need). Unless the connection was hung up while `batch` was
    /// out of the queue (`hang_up` cleared the queue then): its replies
    /// are dropped here, releasing their slots, which `serve` waits for
    /// before it ends. Put back into a closed outbox, they would keep
    /// those slots forever and hang the connection's thread, which holds
    /// one of the export's few connection slots (found by the
    /// `nbd_client` fuzzer). Returns whether the writer has work.
    pub(super) fn requeue_for_writer(
        self: &Arc<Self>,
        ob: &mut MutexGuard<'_, Outbox>,
        batch: VecDeque<Reply>,
    ) -> bool {
        if ob.closed {
            return false;
        }
        for r in batch.into_iter().rev() {
            ob.queue.push_front(r);
        }
        ob.congested = true;
        if ob.writer.is_none() {
            let c = self.clone();
            match crate::frontend::spawn_thread_sized("nbd-tx", CONN_STACK, move || c.writer()) {
                Ok(t) => ob.writer = Some(t),
                Err(_) => {
                    self.hang_up(ob);
                    return false;
                }
            }
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;
    use std::os::unix::net::UnixStream;

    fn conn() -> (Arc<Conn>, UnixStream, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        let (ours, peer) = UnixStream::pair().unwrap();
        let conn = Arc::new(Conn {
            sock: Arc::new(Sock::new(ours.into())),
            session: Session {
                size: 4096,
                read_only: false,
                structured: false,
                base_allocation: false,
                dirty_bitmap: None,
                max_payload: 4096,
            },
            outbox: Mutex::new(Outbox::default()),
            wake_writer: Condvar::new(),
            slots: Budget::new(8),
            bytes: Budget::new(1 << 20),
            disk: crate::disk::Disk::new(Arc::new(img)),
        });
        (conn, peer, f)
    }

    /// The interleaving the fuzzer hit: a pool thread's non-blocking send
    /// took part of its batch, and before it took the outbox lock again
    /// the reader hung the connection up (clearing the queue). What is
    /// left of the batch must be dropped, not queued: its slots are what
    /// `serve` waits for before the connection ends.
    #[test]
    fn a_batch_left_over_after_a_hang_up_releases_its_slots() {
        let (conn, _peer, _f) = conn();
        let batch: VecDeque<Reply> = (0..3)
            .map(|h| Reply::new(simple_reply(0, h).to_vec(), vec![conn.slots.acquire(1)]))
            .collect();
        assert_eq!(conn.slots.used(), 3);
        let mut ob = lock(&conn.outbox);
        conn.hang_up(&mut ob);
        assert!(!conn.requeue_for_writer(&mut ob, batch));
        assert!(ob.queue.is_empty() && ob.writer.is_none());
        drop(ob);
        assert_eq!(conn.slots.used(), 0, "slots kept by a closed connection");
        // So `serve`'s wait for idle slots ends.
        conn.slots.wait_idle();
    }

    /// While the connection is open the rest goes back to the head of the
    /// queue, for the writer thread.
    #[test]
    fn a_batch_left_over_while_open_goes_back_first_for_the_writer() {
        let (conn, _peer, _f) = conn();
        let mut ob = lock(&conn.outbox);
        ob.queue
            .push_back(Reply::new(vec![9], vec![conn.slots.acquire(1)]));
        let batch: VecDeque<Reply> = [Reply::new(vec![1], vec![conn.slots.acquire(1)])].into();
        assert!(conn.requeue_for_writer(&mut ob, batch));
        assert_eq!(
            ob.queue.iter().map(|r| r.head[0]).collect::<Vec<_>>(),
            [1, 9]
        );
        assert!(ob.congested && ob.writer.is_some());
        conn.hang_up(&mut ob);
        let writer = ob.writer.take().unwrap();
        drop(ob);
        conn.wake_writer.notify_all();
        writer.join().unwrap();
        assert_eq!(conn.slots.used(), 0);
    }
}
