//! An admitted request's ticket: counted in flight (so pause and close
//! wait for it) until it finishes or is dropped.

use super::{Disk, DiskError, IoKind};
use crate::image::{Image, ImageError};
use std::sync::Arc;
use std::time::Instant;

/// What [`Disk::try_admit`] decided.
#[derive(Debug)]
pub enum Admission<'d> {
    /// Go ahead, on the ticket's image.
    Now(Ticket<'d>),
    /// Paused (or pausing): serve it with [`Disk::io`], which waits.
    Held,
    /// Closed for good: the request fails with EIO (already counted).
    Closed,
}

/// One admitted request (see [`Disk::try_admit`]). Finishing it (or
/// dropping it, which counts as a failure) ends its time in flight.
#[derive(Debug)]
pub struct Ticket<'d> {
    pub(super) disk: &'d Disk,
    /// Always `Some` until finished.
    pub(super) image: Option<Arc<dyn Image>>,
    pub(super) generation: u64,
    pub(super) start: Instant,
}

impl Ticket<'_> {
    /// The image this request was admitted to.
    pub fn image(&self) -> &dyn Image {
        // `image` is taken only by `end`, which runs when the ticket is
        // consumed (finish, run after `f`, drop): never before this call.
        self.image
            .as_deref()
            .expect("a ticket holds its image until it is finished")
    }

    /// See [`Disk::open_generation`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The request is done: `bytes` transferred (for stats), `ok` or not.
    pub fn finish(mut self, kind: IoKind, bytes: u64, ok: bool) {
        self.end(kind, bytes, ok);
    }

    /// Run the request synchronously on this thread and finish it.
    pub fn run<T>(
        mut self,
        kind: IoKind,
        bytes: u64,
        f: impl FnOnce(&dyn Image) -> Result<T, ImageError>,
    ) -> Result<T, DiskError> {
        let result = f(self.image());
        self.end(kind, bytes, result.is_ok());
        result.map_err(DiskError::from)
    }

    /// Out of flight without being counted: the request was declined
    /// and will be run again (see [`Disk::try_io`]).
    pub(super) fn release(mut self) {
        if self.image.take().is_some() {
            self.disk.leave();
        }
    }

    fn end(&mut self, kind: IoKind, bytes: u64, ok: bool) {
        // The image goes before pause may proceed (a pause flushes and
        // drops it, expecting to hold the last reference).
        if self.image.take().is_some() {
            let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.disk.leave();
            self.disk.account(kind, bytes, us, ok);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.end(IoKind::Other, 0, false);
    }
}
