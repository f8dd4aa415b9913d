//! The disk a worker serves: the open image chain behind a gate that lets
//! `pause` quiesce I/O and swap the chain while the frontend stays up.
//!
//! Frontends never hold an image directly; they call [`Disk::io`] for each
//! request. While the disk is paused, requests wait (as blktap's queue
//! does) instead of failing, so the kernel device sees a stall, not errors.

use crate::image::{Image, ImageError};
use crate::qos::Throttle;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

mod counters;
mod gate;
mod ticket;

pub use counters::{FrontendCounters, IoKind};
pub use ticket::{Admission, Ticket};

#[derive(Debug)]
enum Gate {
    Open(Arc<dyn Image>),
    /// A pause is waiting for in-flight requests to drain.
    Draining(Arc<dyn Image>),
    Paused,
    Closed,
}

#[derive(Debug)]
struct Inner {
    gate: Gate,
    in_flight: u64,
    /// Bumped by every resume: which image a [`Ticket`] was admitted to.
    generation: u64,
}

/// The served disk. Cheap to share: frontends keep an `Arc<Disk>`.
#[derive(Debug)]
pub struct Disk {
    inner: Mutex<Inner>,
    changed: Condvar,
    size: AtomicU64,
    read_only: std::sync::atomic::AtomicBool,
    pub counters: FrontendCounters,
    /// I/O limits, taken before a read or write is admitted.
    throttle: Arc<Throttle>,
    /// The changed-block bitmaps of this disk, for frontends that export
    /// them (NBD's `qemu:dirty-bitmap:NAME`).
    cbt: std::sync::OnceLock<Arc<crate::cbt::Tracker>>,
}

/// Why a request could not reach an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk is closed")]
    Closed,
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl DiskError {
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::Closed => libc::EIO,
            DiskError::Image(e) => e.errno(),
        }
    }
}

impl Disk {
    pub fn new(image: Arc<dyn Image>) -> Arc<Self> {
        Disk::with_throttle(image, Arc::default())
    }

    /// A disk whose reads and writes pass `throttle` first (the worker's,
    /// which keeps its limits across pause and unpause).
    pub fn with_throttle(image: Arc<dyn Image>, throttle: Arc<Throttle>) -> Arc<Self> {
        Arc::new(Disk {
            throttle,
            size: AtomicU64::new(image.virtual_size()),
            read_only: image.read_only().into(),
            inner: Mutex::new(Inner {
                gate: Gate::Open(image),
                in_flight: 0,
                generation: 0,
            }),
            changed: Condvar::new(),
            counters: FrontendCounters::default(),
            cbt: std::sync::OnceLock::new(),
        })
    }

    /// Make `tracker` this disk's bitmaps (once; later calls keep the first).
    pub fn set_cbt(&self, tracker: Arc<crate::cbt::Tracker>) {
        let _ = self.cbt.set(tracker);
    }

    /// The changed-block bitmaps, if the worker tracks any for this disk.
    pub fn cbt(&self) -> Option<&Arc<crate::cbt::Tracker>> {
        self.cbt.get()
    }

    /// Virtual size; constant for the disk's life (unpause refuses a change).
    pub fn size(&self) -> u64 {
        self.size.load(Relaxed)
    }

    pub fn read_only(&self) -> bool {
        self.read_only.load(Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug elsewhere; the data is
        // two plain fields and stays consistent, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run one request against the image, waiting while paused.
    /// `bytes` is the request's data length, for stats.
    pub fn io<T>(
        &self,
        kind: IoKind,
        bytes: u64,
        f: impl FnOnce(&dyn Image) -> Result<T, ImageError>,
    ) -> Result<T, DiskError> {
        if let Some(dir) = kind.dir() {
            // Before admission: a request waiting for its slot is not in
            // flight, so pause and close need not wait for it.
            self.throttle.admit(dir, bytes);
        }
        self.io_taken(kind, bytes, f)
    }

    /// Take a request's throttle tokens now, in arrival order, without
    /// waiting; returns when it may run (`None`: at once). The caller
    /// waits with [`Disk::pace_until`] where it does not hold up other
    /// requests, then runs it with [`Disk::io_taken`].
    pub fn take_tokens(&self, kind: IoKind, bytes: u64) -> Option<Instant> {
        let wait = kind.dir().map_or(0, |d| self.throttle.take(d, bytes));
        (wait > 0).then(|| Instant::now() + std::time::Duration::from_nanos(wait))
    }

    /// Sleep until `deadline`, or less if the disk closes meanwhile (not
    /// at all once it is closed: a queue of delayed requests then fails
    /// at once instead of waiting out its schedule).
    pub fn pace_until(&self, deadline: Instant) {
        // Counted before the check: a close between the two still ends
        // the sleep.
        let start = self.throttle.interrupts();
        if matches!(self.lock().gate, Gate::Closed) {
            return;
        }
        self.throttle.sleep_from(start, deadline);
    }

    /// [`Disk::io`] for a request whose tokens were taken already
    /// ([`Disk::take_tokens`]).
    pub fn io_taken<T>(
        &self,
        kind: IoKind,
        bytes: u64,
        f: impl FnOnce(&dyn Image) -> Result<T, ImageError>,
    ) -> Result<T, DiskError> {
        self.counters.received.fetch_add(1, Relaxed);
        let admitted = {
            let mut inner = self.lock();
            loop {
                match &inner.gate {
                    Gate::Open(img) => {
                        let img = img.clone();
                        break Some(self.ticket(&mut inner, img));
                    }
                    Gate::Closed => break None,
                    Gate::Draining(_) | Gate::Paused => {
                        inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        };
        match admitted {
            Some(ticket) => ticket.run(kind, bytes, f),
            None => {
                self.refuse();
                Err(DiskError::Closed)
            }
        }
    }

    /// Admit one request without waiting, for frontends that keep many
    /// requests in flight on one thread (ublk's queue rings): while the
    /// disk is open the request gets a [`Ticket`], which holds the image
    /// and counts as in flight — `pause` and `close` wait for it — until it
    /// is finished or dropped, on any thread. While paused it is
    /// [`Admission::Held`]: the caller hands it to a thread that may block
    /// in [`Disk::io`].
    /// A request the throttle would delay is `Held` too (without taking
    /// its tokens: `Disk::io` takes them and waits).
    pub fn try_admit(&self, kind: IoKind, bytes: u64) -> Admission<'_> {
        let dir = kind.dir();
        if dir.is_some_and(|d| !self.throttle.ready(d, bytes)) {
            return Admission::Held;
        }
        self.admit_gate(kind, bytes, true)
    }

    /// [`Disk::try_admit`] for a request whose tokens were taken already
    /// ([`Disk::take_tokens`]): `Held` only while paused.
    pub fn try_admit_taken(&self, kind: IoKind, bytes: u64) -> Admission<'_> {
        self.admit_gate(kind, bytes, false)
    }

    fn admit_gate(&self, kind: IoKind, bytes: u64, take: bool) -> Admission<'_> {
        let dir = kind.dir().filter(|_| take);
        let mut inner = self.lock();
        match &inner.gate {
            Gate::Open(img) => {
                if let Some(d) = dir {
                    self.throttle.take(d, bytes);
                }
                let img = img.clone();
                self.counters.received.fetch_add(1, Relaxed);
                Admission::Now(self.ticket(&mut inner, img))
            }
            Gate::Draining(_) | Gate::Paused => Admission::Held,
            Gate::Closed => {
                self.counters.received.fetch_add(1, Relaxed);
                self.refuse();
                Admission::Closed
            }
        }
    }

    /// The generation of the open image, `None` while paused or closed.
    /// Files a frontend registered for an older generation are stale.
    pub fn open_generation(&self) -> Option<u64> {
        let inner = self.lock();
        matches!(inner.gate, Gate::Open(_)).then_some(inner.generation)
    }

    fn ticket(&self, inner: &mut Inner, image: Arc<dyn Image>) -> Ticket<'_> {
        inner.in_flight += 1;
        Ticket {
            disk: self,
            image: Some(image),
            generation: inner.generation,
            start: Instant::now(),
        }
    }

    /// Count a request refused because the disk is closed.
    fn refuse(&self) {
        self.counters.completed.fetch_add(1, Relaxed);
        self.counters.errors.fetch_add(1, Relaxed);
    }

    /// [`Disk::io`] for a request that may be answered without waiting
    /// (`f` returns `None` when it would have to wait, e.g. a read that
    /// misses the page cache). Never blocks: returns `None` without
    /// counting anything when the disk is not open (paused, draining,
    /// closed) or `f` declined, and the caller then runs the request with
    /// [`Disk::io`] as usual.
    pub fn try_io<T>(
        &self,
        kind: IoKind,
        bytes: u64,
        f: impl FnOnce(&dyn Image) -> Option<T>,
    ) -> Option<T> {
        let dir = kind.dir();
        if dir.is_some_and(|d| !self.throttle.ready(d, bytes)) {
            return None;
        }
        let ticket = {
            let mut inner = self.lock();
            let Gate::Open(img) = &inner.gate else {
                return None;
            };
            let img = img.clone();
            self.ticket(&mut inner, img)
        };
        let result = f(ticket.image());
        if result.is_some() {
            if let Some(d) = dir {
                // Served already: its tokens are taken after the fact
                // (the next requests wait for them).
                self.throttle.take(d, bytes);
            }
            self.counters.received.fetch_add(1, Relaxed);
            ticket.finish(kind, bytes, true);
        } else {
            ticket.release();
        }
        result
    }

    /// A request is done with the image: let pause/close proceed.
    fn leave(&self) {
        let mut inner = self.lock();
        inner.in_flight -= 1;
        if inner.in_flight == 0 {
            self.changed.notify_all();
        }
    }

    /// Count a finished request.
    fn account(&self, kind: IoKind, bytes: u64, us: u64, ok: bool) {
        let c = &self.counters;
        match kind {
            IoKind::Read => {
                c.read_secs.fetch_add(bytes.div_ceil(512), Relaxed);
                c.read_us_total.fetch_add(us, Relaxed);
                c.read_count.fetch_add(1, Relaxed);
                c.read_us_max.fetch_max(us, Relaxed);
                c.histograms.read.record(us);
            }
            IoKind::Write => {
                c.write_secs.fetch_add(bytes.div_ceil(512), Relaxed);
                c.write_us_total.fetch_add(us, Relaxed);
                c.write_count.fetch_add(1, Relaxed);
                c.write_us_max.fetch_max(us, Relaxed);
                c.histograms.write.record(us);
            }
            IoKind::Flush => c.histograms.flush.record(us),
            IoKind::Discard => c.histograms.discard.record(us),
            IoKind::Other => {}
        }
        if !ok {
            c.errors.fetch_add(1, Relaxed);
        }
        c.completed.fetch_add(1, Relaxed);
    }

    /// Layer counters of the current image (empty while paused).
    pub fn image_stats(&self) -> Vec<crate::image::LayerStats> {
        match &self.lock().gate {
            Gate::Open(img) | Gate::Draining(img) => img.stats(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;
    use std::time::Duration;

    fn disk() -> (tempfile::NamedTempFile, Arc<Disk>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        (f, Disk::new(Arc::new(img)))
    }

    #[test]
    fn paused_disk_holds_requests_until_resumed() {
        let (f, disk) = disk();
        disk.pause().unwrap();
        let d2 = disk.clone();
        let t = std::thread::spawn(move || d2.io(IoKind::Write, 1, |img| img.write_at(b"x", 0)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "request must wait while paused");
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        disk.resume(Arc::new(img)).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(disk.counters.secs(), [0, 1]);
    }

    #[test]
    fn switch_waits_for_admitted_requests_holds_new_ones_and_serves_the_new_image() {
        let (_f, disk) = disk();
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().set_len(4096).unwrap();
        let Admission::Now(ticket) = disk.try_admit(IoKind::Read, 512) else {
            panic!("an open disk admits");
        };
        let finished = std::sync::atomic::AtomicBool::new(false);
        let (img, _stall) = std::thread::scope(|s| {
            let switcher = s.spawn(|| {
                disk.switch(|| {
                    assert!(
                        finished.load(std::sync::atomic::Ordering::SeqCst),
                        "the new image is built only once in-flight requests are done"
                    );
                    assert!(
                        matches!(disk.try_admit(IoKind::Write, 512), Admission::Held),
                        "requests arriving during the switch are held"
                    );
                    let img = RawImage::open(Box::new(g.reopen().unwrap()), "g", false)?;
                    Ok(Arc::new(img) as Arc<dyn Image>)
                })
            });
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            ticket.finish(IoKind::Read, 512, true);
            switcher.join().unwrap().unwrap()
        });
        assert_eq!(img.stats()[0].name, "g");
        assert_eq!(disk.open_generation(), Some(1));
        disk.io(IoKind::Write, 1, |i| i.write_at(b"y", 0)).unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(g.as_file(), &mut b, 0).unwrap();
        assert_eq!(&b, b"y", "writes after the switch reach the new image");
    }

    #[test]
    fn failed_switch_keeps_the_old_image_serving() {
        let (f, disk) = disk();
        let r = disk.switch(|| Err(ImageError::InvalidArgument("no".into())));
        assert!(r.is_err());
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().set_len(8192).unwrap();
        let r = disk.switch(|| {
            let img = RawImage::open(Box::new(g.reopen().unwrap()), "g", false)?;
            Ok(Arc::new(img) as Arc<dyn Image>)
        });
        assert!(r.is_err(), "a new image of another size is refused");
        assert_eq!(disk.open_generation(), Some(0));
        disk.io(IoKind::Write, 1, |i| i.write_at(b"z", 0)).unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(f.as_file(), &mut b, 0).unwrap();
        assert_eq!(&b, b"z");
    }

    #[test]
    fn resume_refuses_a_different_size() {
        let (_f, disk) = disk();
        disk.pause().unwrap();
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().set_len(8192).unwrap();
        let img = RawImage::open(Box::new(g.reopen().unwrap()), "g", false).unwrap();
        assert!(disk.resume(Arc::new(img)).is_err());
    }

    #[test]
    fn pause_waits_for_an_admitted_ticket_finished_on_another_thread() {
        let (f, disk) = disk();
        let Admission::Now(ticket) = disk.try_admit(IoKind::Read, 512) else {
            panic!("an open disk admits");
        };
        assert_eq!(ticket.generation(), 0);
        assert_eq!(disk.open_generation(), Some(0));
        let d2 = disk.clone();
        let pauser = std::thread::spawn(move || d2.pause());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pauser.is_finished(), "pause waits for the ticket");
        assert!(matches!(disk.try_admit(IoKind::Read, 512), Admission::Held));
        std::thread::scope(|s| {
            s.spawn(move || ticket.finish(IoKind::Write, 4096, true));
        });
        pauser.join().unwrap().unwrap();
        assert!(matches!(disk.try_admit(IoKind::Read, 512), Admission::Held));
        assert_eq!(disk.open_generation(), None);
        assert_eq!(disk.counters.secs(), [0, 8]);
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        disk.resume(Arc::new(img)).unwrap();
        match disk.try_admit(IoKind::Read, 512) {
            Admission::Now(t) => assert_eq!(t.generation(), 1, "a new image, a new generation"),
            other => panic!("{other:?}"),
        }
        disk.close().unwrap();
        assert!(matches!(
            disk.try_admit(IoKind::Read, 512),
            Admission::Closed
        ));
        assert_eq!(disk.counters.outstanding(), 0);
    }

    #[test]
    fn dropped_ticket_counts_as_a_failure_and_lets_pause_proceed() {
        let (_f, disk) = disk();
        let Admission::Now(ticket) = disk.try_admit(IoKind::Read, 512) else {
            panic!("an open disk admits");
        };
        drop(ticket);
        disk.pause().unwrap();
        assert_eq!(disk.counters.frontend("ublk").errors, 1);
        assert_eq!(disk.counters.outstanding(), 0);
    }

    #[test]
    fn throttled_requests_are_held_from_the_fast_paths_and_paced_by_io() {
        use tapjail_common::qos::{IoLimits, Knob, Rate};
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        let throttle = Arc::new(crate::qos::Throttle::default());
        let mut l = IoLimits::default();
        l.set(
            Knob::WriteIops,
            Some(Rate {
                per_sec: 1,
                burst: 1,
            }),
        );
        throttle.set(l, IoLimits::default(), None).unwrap();
        let disk = Disk::with_throttle(Arc::new(img), throttle.clone());
        // The burst passes the non-blocking paths at once...
        let Admission::Now(t) = disk.try_admit(IoKind::Write, 512) else {
            panic!("the first write is within the burst");
        };
        t.finish(IoKind::Write, 512, true);
        // ...the next write is held for the slow path, reads still go.
        assert!(matches!(
            disk.try_admit(IoKind::Write, 512),
            Admission::Held
        ));
        assert_eq!(disk.try_io(IoKind::Write, 512, |_| Some(())), None);
        assert!(matches!(
            disk.try_admit(IoKind::Read, 512),
            Admission::Now(_)
        ));
        assert_eq!(throttle.stats().paced, [0, 1], "held requests took nothing");
        // A held write waits in `io`; closing the disk cuts the wait short
        // (the request fails fast instead of outliving the disk).
        let d2 = disk.clone();
        let w = std::thread::spawn(move || d2.io(IoKind::Write, 1, |img| img.write_at(b"x", 0)));
        while throttle.stats().paced[1] < 2 {
            std::thread::yield_now();
        }
        assert_eq!(throttle.stats().delayed, [0, 1]);
        while !w.is_finished() {
            disk.close().unwrap();
            std::thread::yield_now();
        }
        assert!(matches!(w.join().unwrap(), Err(DiskError::Closed)));
    }

    #[test]
    fn try_io_declined_counts_nothing_and_lets_pause_proceed() {
        let (f, disk) = disk();
        assert_eq!(disk.try_io(IoKind::Read, 512, |_| None::<()>), None);
        disk.pause().unwrap();
        let stats = disk.counters.frontend("ublk");
        assert_eq!((stats.errors, disk.counters.secs()), (0, [0, 0]));
        assert_eq!(disk.try_io(IoKind::Read, 512, |_| Some(())), None, "paused");
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", false).unwrap();
        disk.resume(Arc::new(img)).unwrap();
        assert_eq!(disk.try_io(IoKind::Read, 512, |_| Some(7)), Some(7));
        assert_eq!(disk.counters.secs(), [1, 0]);
        assert_eq!(disk.counters.outstanding(), 0);
    }

    #[test]
    fn closed_disk_fails_requests_with_eio() {
        let (_f, disk) = disk();
        disk.close().unwrap();
        let err = disk.io(IoKind::Read, 1, |_| Ok(())).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
    }
}
