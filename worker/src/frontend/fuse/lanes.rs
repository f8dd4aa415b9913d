//! Per-direction throttle lanes (NBD's and ublk's have them too).
//!
//! Every request comes off the one `/dev/fuse` queue, so a serving thread
//! that sleeps for a delayed write's tokens is a thread that cannot read
//! the next request, which may be a read with tokens to spare: with a
//! write limit and more writes in flight than threads, reads waited
//! behind writes. Instead, a small request out of tokens is queued on its
//! direction's lane and the serving thread goes back to reading. One
//! pacer thread serves both lanes: it sleeps until the earliest slot
//! among the two lanes' heads (woken by a new job), serves that request
//! and replies, so a read due now never waits for a write due later, only
//! for the one request the pacer is running. One thread, not one per
//! lane: under an 8 MiB memlock limit a worker has room for two or three
//! threads in all. Tokens are taken in arrival order before the hand-off,
//! so each lane's queue is in order of release.
//!
//! A delayed write's payload (up to a page: what a 4 KiB block write
//! is) is copied into a slot from a fixed set made at start (nothing is
//! allocated while serving, which under `mlockall` could abort). With no
//! slot free, a full queue, or a larger request, the serving thread waits
//! itself, as before.

use super::buf::IoBuf;
use super::request::ReadIn;
use super::{read_reply, write_reply, Shared, SERVE_STACK};
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Lane of delayed reads.
pub const READS: usize = 0;
/// Lane of delayed writes.
pub const WRITES: usize = 1;
/// Most slots (delayed writes handed off at once).
pub const MAX_SPARES: usize = 32;
/// Most jobs queued in a lane (FUSE allows 128 background requests).
const MAX_QUEUE: usize = 128;

/// A request waiting for its slot.
#[derive(Debug)]
pub enum Job {
    Read {
        unique: u64,
        read: ReadIn,
        due: Instant,
    },
    Write {
        unique: u64,
        node: u64,
        offset: u64,
        len: usize,
        /// A slot holding the payload in its data area.
        buf: IoBuf,
        due: Instant,
    },
}

impl Job {
    fn due(&self) -> Instant {
        match self {
            Job::Read { due, .. } | Job::Write { due, .. } => *due,
        }
    }
}

#[derive(Debug, Default)]
struct Queues {
    jobs: [VecDeque<Job>; 2],
    /// The pacer runs (set once it does; until then nothing is queued).
    open: bool,
    /// No more jobs: the lanes finish what they hold and end.
    closed: bool,
}

/// Both lanes and the spare buffers.
#[derive(Debug, Default)]
pub struct Lanes {
    q: Mutex<Queues>,
    ready: Condvar,
    spares: Mutex<Vec<IoBuf>>,
}

impl Lanes {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pacer is about to run, with `spares` for delayed writes.
    pub fn open(&self, spares: Vec<IoBuf>) {
        let mut q = self.lock();
        for j in &mut q.jobs {
            j.reserve(MAX_QUEUE);
        }
        q.open = true;
        q.closed = false;
        *self.spares.lock().unwrap_or_else(|e| e.into_inner()) = spares;
    }

    /// Queue `job` on `lane`; gives it back if the pacer does not run, the
    /// lanes are closing or that lane is full.
    pub fn submit(&self, lane: usize, job: Job) -> Result<(), Job> {
        let mut q = self.lock();
        if !q.open || q.closed || q.jobs[lane].len() >= MAX_QUEUE {
            return Err(job);
        }
        q.jobs[lane].push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    /// The job whose slot comes first among both lanes' heads, once that
    /// slot has come; `None` once closed and empty. After `close` jobs are
    /// given at once (the disk is going away; nobody waits for a slot).
    pub fn next(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            let first = [READS, WRITES]
                .into_iter()
                .filter_map(|l| q.jobs[l].front().map(|j| (j.due(), l)))
                .min();
            match first {
                Some((due, lane)) => {
                    let now = Instant::now();
                    if q.closed || due <= now {
                        return q.jobs[lane].pop_front();
                    }
                    q = self
                        .ready
                        .wait_timeout(q, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None if q.closed => return None,
                None => q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Take no more jobs; the pacer ends once those queued are served.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        self.ready.notify_all();
    }

    /// A spare buffer to carry a delayed write's payload, if one is free.
    pub fn take_spare(&self) -> Option<IoBuf> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Give a spare back (its capacity was reserved at `open`).
    pub fn put_spare(&self, b: IoBuf) {
        self.spares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(b);
    }
}

// The pacer thread, with the serving threads' state.

/// Start the pacer with up to `spares` write slots (as many as
/// fit); no lanes if its own buffer or thread cannot be had.
pub(super) fn start<'s, 'a: 's>(
    s: &'s std::thread::Scope<'s, '_>,
    shared: &'s Shared<'a>,
    spares: usize,
) {
    let Ok(own) = IoBuf::small() else {
        return;
    };
    let mut bufs = Vec::with_capacity(spares);
    for _ in 0..spares {
        match IoBuf::slot() {
            Ok(b) => bufs.push(b),
            Err(_) => break,
        }
    }
    shared.lanes.open(bufs);
    let spawned = std::thread::Builder::new()
        .name("fuse-pacer".into())
        .stack_size(SERVE_STACK)
        .spawn_scoped(s, move || pace(shared, own));
    if let Err(e) = spawned {
        // Closed: every delayed request waits in its serving thread.
        tracing::warn!(
            frontend = "fuse",
            "no throttle pacer thread ({e}): delayed requests wait in the serving threads"
        );
        shared.lanes.close();
    }
}

/// The pacer: serve each delayed job at its slot, earliest first.
fn pace(shared: &Shared<'_>, mut own: IoBuf) {
    while let Some(job) = shared.lanes.next() {
        let r = match job {
            Job::Read { unique, read, .. } => read_reply(shared, unique, &read, &mut own),
            Job::Write {
                unique,
                node,
                offset,
                len,
                mut buf,
                ..
            } => {
                let r = write_reply(shared, unique, node, offset, &buf.data_area()[..len]);
                shared.lanes.put_spare(buf);
                r
            }
        };
        if let Err(e) = r {
            shared.fail(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(unique: u64, due: Instant) -> Job {
        Job::Read {
            unique,
            read: ReadIn {
                offset: 0,
                size: 4096,
            },
            due,
        }
    }

    fn unique(j: Job) -> u64 {
        match j {
            Job::Read { unique, .. } => unique,
            Job::Write { .. } => unreachable!(),
        }
    }

    #[test]
    fn the_earliest_slot_of_either_lane_goes_first_and_close_drains_at_once() {
        let l = Lanes::default();
        let now = Instant::now();
        assert!(l.submit(READS, read(1, now)).is_err(), "not open: refused");
        l.open(Vec::new());
        let later = now + std::time::Duration::from_secs(3600);
        // A write-lane job due in an hour queued first...
        l.submit(WRITES, read(1, later)).unwrap();
        // ...does not hold up a read due now.
        l.submit(READS, read(2, now)).unwrap();
        assert_eq!(l.next().map(unique), Some(2));
        l.close();
        assert!(l.submit(READS, read(3, now)).is_err(), "closed: refused");
        // Closing: the hour-away job comes out at once.
        assert_eq!(l.next().map(unique), Some(1));
        assert!(l.next().is_none());
    }
}
