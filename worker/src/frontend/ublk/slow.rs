//! The slow path of a ublk queue: a few threads that run requests through
//! the synchronous image engine, so that the queue's ring never waits for
//! one.
//!
//! Requests land here when no direct mapping serves them: a first write to
//! a VHD block (allocation, with its syncs), a sector bitmap to update or
//! to load, partial mappings, discard and write-zeroes, a flush that must
//! write metadata, and every request while the disk is paused (those wait
//! in [`Disk::io`] here, not on the ring). A finished request goes onto a
//! done list and the queue thread is woken through an eventfd that its ring
//! always has a READ pending on; the queue thread then commits it, as only
//! that thread may talk to the driver about its queue.

use super::mem::TagRegion;
use super::request::{self, Request};
use crate::disk::{Disk, Ticket};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Slow-path threads per queue. Allocations serialize on the image's
/// allocation lock anyway; a few threads let a write that allocates, a
/// discard and a metadata flush overlap, and the direct path carries the
/// bulk of the traffic.
pub const SLOW_THREADS: usize = 4;

/// Stack of a slow-path thread: it runs the image engine, like an NBD I/O
/// thread (see `nbd::sizing::IO_STACK`).
pub const SLOW_STACK: usize = 64 * 1024;

/// One request for the slow path.
#[derive(Debug)]
pub struct Job<'d> {
    pub tag: u16,
    pub req: Request,
    /// The tag's buffer, owned by the job until its result is taken.
    pub buf: TagRegion,
    /// Admitted already (the image it must run on); `None` when the disk
    /// was paused or the I/O limits delay it: then it waits for admission
    /// in [`Disk::io_taken`].
    pub ticket: Option<Ticket<'d>>,
    /// Its throttle tokens were taken when it arrived; the limits delay
    /// it until then. It waits on its direction's own lane thread, so a
    /// direction out of tokens holds up neither the slow-path threads nor
    /// the other direction.
    pub due: Option<Instant>,
}

#[derive(Debug, Default)]
struct Jobs<'d> {
    queue: VecDeque<Job<'d>>,
    /// Delayed reads and writes, each in arrival order.
    paced: [VecDeque<Job<'d>>; 2],
    closed: bool,
}

/// A delayed job's lane: reads 0, writes 1.
fn lane(req: &Request) -> usize {
    usize::from(matches!(req, Request::Write { .. }))
}

/// Lane threads per queue, one per direction (see [`Job::due`]).
pub const PACED_THREADS: usize = crate::qos::PACED_LANES;

/// The shared state of one queue's slow path.
#[derive(Debug)]
pub struct SlowPath<'d> {
    jobs: Mutex<Jobs<'d>>,
    /// Slow-path threads wait here, each lane's thread on its own
    /// `paced_more`: a notify_one on a condvar shared with the lane
    /// threads could wake a lane thread, which finds its lane empty and
    /// sleeps again, and the job then waited forever in `queue` (a FLUSH
    /// hung that way in nestvm).
    more: Condvar,
    paced_more: [Condvar; PACED_THREADS],
    done: Mutex<Vec<(u16, i32)>>,
    wake: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain queues: a panicking holder leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'d> SlowPath<'d> {
    pub fn new() -> io::Result<Self> {
        Ok(SlowPath {
            jobs: Mutex::new(Jobs::default()),
            more: Condvar::new(),
            paced_more: Default::default(),
            done: Mutex::new(Vec::new()),
            wake: EventFd::new()?,
        })
    }

    /// The eventfd the queue ring reads to learn of finished jobs.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.0.as_raw_fd()
    }

    pub fn submit(&self, job: Job<'d>) {
        let mut jobs = lock(&self.jobs);
        match job.due {
            Some(_) => {
                let l = lane(&job.req);
                jobs.paced[l].push_back(job);
                drop(jobs);
                self.paced_more[l].notify_one();
            }
            None => {
                jobs.queue.push_back(job);
                drop(jobs);
                self.more.notify_one();
            }
        }
    }

    /// Finished jobs since the last call: (tag, result to commit).
    pub fn take_done(&self, into: &mut Vec<(u16, i32)>) {
        into.append(&mut lock(&self.done));
    }

    /// No more jobs: threads end once the queue is empty.
    pub fn close(&self) {
        lock(&self.jobs).closed = true;
        self.more.notify_all();
        for lane in &self.paced_more {
            lane.notify_all();
        }
    }

    /// A slow-path thread: run jobs until closed.
    pub fn serve(&self, disk: &'d Disk) {
        self.serve_from(disk, None);
    }

    /// A lane thread: run delayed jobs of `lane` (0 reads, 1 writes), each
    /// at its time, until closed.
    pub fn serve_paced(&self, disk: &'d Disk, lane: usize) {
        self.serve_from(disk, Some(lane));
    }

    fn serve_from(&self, disk: &'d Disk, lane: Option<usize>) {
        loop {
            let job = {
                let mut jobs = lock(&self.jobs);
                loop {
                    let next = match lane {
                        None => jobs.queue.pop_front(),
                        Some(l) => jobs.paced[l].pop_front(),
                    };
                    if let Some(j) = next {
                        break j;
                    }
                    if jobs.closed {
                        return;
                    }
                    let wait_on = match lane {
                        None => &self.more,
                        Some(l) => &self.paced_more[l],
                    };
                    jobs = wait_on.wait(jobs).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Job {
                tag,
                req,
                mut buf,
                ticket,
                due,
            } = job;
            if let Some(due) = due {
                disk.pace_until(due);
            }
            // SAFETY: the queue thread handed this tag over with the job and
            // touches neither it nor its buffer until it takes the result
            // from the done list; the buffers outlive this thread (it is
            // scoped inside the queue's run, which owns them).
            let data = unsafe { buf.as_mut_slice() };
            let result = match ticket {
                Some(t) => request::execute_admitted(t, req, data),
                None => request::execute_taken(disk, req, data),
            };
            lock(&self.done).push((tag, result));
            if let Err(e) = self.wake.signal() {
                // Cannot happen with a counter far from overflow; the queue
                // also polls the done list on its periodic wakeup.
                tracing::warn!(frontend = "ublk", "waking the queue: {e}");
            }
        }
    }
}

/// An eventfd counter (blocking: the ring's READ on it then waits for a
/// signal instead of failing with EAGAIN).
#[derive(Debug)]
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes plain integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our own eventfd.
        let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Admission;
    use crate::frontend::ublk::mem::IoBuffers;
    use crate::image::raw::RawImage;
    use std::sync::Arc;

    #[test]
    fn slow_path_runs_jobs_and_signals_the_eventfd() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        let disk = Disk::new(Arc::new(img));
        let bufs = IoBuffers::new(2, 8192).unwrap();
        let slow = SlowPath::new().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| slow.serve(&disk));
            let Admission::Now(t) = disk.try_admit(crate::disk::IoKind::Write, 4096) else {
                panic!("open disk");
            };
            slow.submit(Job {
                tag: 1,
                req: Request::Write {
                    offset: 4096,
                    len: 8192,
                    fua: false,
                },
                buf: bufs.region(1, 8192).unwrap(),
                ticket: Some(t),
                due: None,
            });
            slow.submit(Job {
                tag: 0,
                req: Request::Read {
                    offset: 1 << 20,
                    len: 512,
                },
                buf: bufs.region(0, 512).unwrap(),
                ticket: None,
                due: None,
            });
            let mut counter = [0u8; 8];
            // SAFETY: reads 8 bytes into a local array from our eventfd.
            let n = unsafe { libc::read(slow.wake_fd(), counter.as_mut_ptr().cast(), 8) };
            assert_eq!(n, 8, "woken");
            let mut done = Vec::new();
            while done.len() < 2 {
                slow.take_done(&mut done);
                std::thread::yield_now();
            }
            slow.close();
            done.sort_unstable();
            assert_eq!(done[0].0, 0);
            assert!(done[0].1 < 0, "read past the end fails: {done:?}");
            assert_eq!(done[1], (1, 8192));
        });
        assert_eq!(
            disk.counters.secs()[1],
            16,
            "the admitted write was counted"
        );
        assert_eq!(disk.counters.outstanding(), 0);
    }

    /// Thread `tid` of this process sleeps in futex(2): it waits on a
    /// condvar. The event the lost-wakeup test orders its threads by.
    fn wait_in_futex(tid: i32) {
        let path = format!("/proc/self/task/{tid}/syscall");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let nr = std::fs::read_to_string(&path).unwrap_or_default();
            if nr.split_whitespace().next() == Some(&libc::SYS_futex.to_string()) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} never waited"
            );
            std::thread::yield_now();
        }
    }

    /// The lane threads went to sleep before the slow-path thread (so a
    /// futex wake, FIFO, would pick a lane thread first); a plain job must
    /// still reach the slow-path thread. With one condvar for both kinds
    /// and `notify_one`, a lane thread took the wakeup, found its lane
    /// empty and slept again: the job (a FLUSH, in nestvm) waited forever.
    #[test]
    fn a_plain_job_wakes_a_slow_thread_even_when_lane_threads_wait_first() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        let disk = Disk::new(Arc::new(img));
        let bufs = IoBuffers::new(1, 4096).unwrap();
        let slow = SlowPath::new().unwrap();
        std::thread::scope(|s| {
            for lane in 0..PACED_THREADS {
                let (tx, rx) = std::sync::mpsc::channel();
                let (slow, disk) = (&slow, &disk);
                s.spawn(move || {
                    tx.send(tapjail_testsupport::gettid()).unwrap();
                    slow.serve_paced(disk, lane)
                });
                wait_in_futex(rx.recv().unwrap());
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let (slow_ref, disk_ref) = (&slow, &disk);
            s.spawn(move || {
                tx.send(tapjail_testsupport::gettid()).unwrap();
                slow_ref.serve(disk_ref)
            });
            wait_in_futex(rx.recv().unwrap());
            slow.submit(Job {
                tag: 0,
                req: Request::Read {
                    offset: 0,
                    len: 4096,
                },
                buf: bufs.region(0, 4096).unwrap(),
                ticket: None,
                due: None,
            });
            let mut wake = libc::pollfd {
                fd: slow.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one pollfd on our own eventfd.
            let n = unsafe { libc::poll(&mut wake, 1, 30_000) };
            slow.close();
            assert_eq!(n, 1, "the job was never run: its wakeup was lost");
            let mut done = Vec::new();
            slow.take_done(&mut done);
            assert_eq!(done, vec![(0, 4096)]);
        });
    }
}
