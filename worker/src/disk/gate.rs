//! The gate's transitions: pause (drain, flush, drop the image), resume,
//! switch to a new chain under held I/O, and close.

use super::{Disk, DiskError, Gate};
use crate::image::{Image, ImageError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

impl Disk {
    /// Stop admitting requests, wait for in-flight ones, flush and drop the
    /// image. Requests arriving meanwhile wait for [`Disk::resume`].
    pub fn pause(&self) -> Result<(), DiskError> {
        let mut inner = self.lock();
        let img = match std::mem::replace(&mut inner.gate, Gate::Paused) {
            Gate::Open(img) | Gate::Draining(img) => img,
            Gate::Paused => return Ok(()),
            Gate::Closed => {
                inner.gate = Gate::Closed;
                return Err(DiskError::Closed);
            }
        };
        inner.gate = Gate::Draining(img.clone());
        while inner.in_flight > 0 {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        let flushed = img.flush();
        inner.gate = Gate::Paused;
        drop(inner);
        flushed?;
        Ok(())
    }

    /// Resume after [`Disk::pause`] with a (possibly different) image of the
    /// same virtual size.
    pub fn resume(&self, image: Arc<dyn Image>) -> Result<(), ImageError> {
        if image.virtual_size() != self.size() {
            return Err(ImageError::InvalidArgument(format!(
                "new image has virtual size {} but the disk has {}; refusing to change the size under a running device",
                image.virtual_size(),
                self.size()
            )));
        }
        self.read_only.store(image.read_only(), Relaxed);
        let mut inner = self.lock();
        inner.gate = Gate::Open(image);
        inner.generation += 1;
        self.changed.notify_all();
        Ok(())
    }

    /// Replace the open image with the one `next` builds, holding requests
    /// meanwhile: stop admitting, drain, flush the old image, build, and
    /// release. On any error the old image serves on, unchanged. Returns
    /// the new image and how long requests were held (online snapshot).
    pub fn switch(
        &self,
        next: impl FnOnce() -> Result<Arc<dyn Image>, ImageError>,
    ) -> Result<(Arc<dyn Image>, std::time::Duration), DiskError> {
        let held = Instant::now();
        let old = {
            let mut inner = self.lock();
            let img = match &inner.gate {
                Gate::Open(img) => img.clone(),
                Gate::Closed => return Err(DiskError::Closed),
                Gate::Draining(_) | Gate::Paused => {
                    return Err(DiskError::Image(ImageError::InvalidArgument(
                        "the disk is paused".into(),
                    )))
                }
            };
            inner.gate = Gate::Draining(img.clone());
            while inner.in_flight > 0 {
                inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
            img
        };
        // Unlocked: held requests wait on `changed`, nothing is admitted.
        let built = old.flush().and_then(|()| next()).and_then(|img| {
            if img.virtual_size() == self.size() {
                Ok(img)
            } else {
                Err(ImageError::InvalidArgument(format!(
                    "new chain has virtual size {} but the disk has {}",
                    img.virtual_size(),
                    self.size()
                )))
            }
        });
        let mut inner = self.lock();
        let result = match built {
            Ok(img) => {
                self.read_only.store(img.read_only(), Relaxed);
                inner.gate = Gate::Open(img.clone());
                inner.generation += 1;
                Ok((img, held.elapsed()))
            }
            Err(e) => {
                inner.gate = Gate::Open(old.clone());
                Err(DiskError::Image(e))
            }
        };
        self.changed.notify_all();
        drop(inner);
        drop(old);
        result
    }

    /// Hold requests (stop admitting, drain) and return the image served,
    /// for a change that must be recorded elsewhere before it is made
    /// (online coalesce): requests wait until [`Disk::release`].
    pub fn hold(&self) -> Result<Arc<dyn Image>, DiskError> {
        let mut inner = self.lock();
        let img = match &inner.gate {
            Gate::Open(img) => img.clone(),
            Gate::Closed => return Err(DiskError::Closed),
            Gate::Draining(_) | Gate::Paused => {
                return Err(DiskError::Image(ImageError::InvalidArgument(
                    "the disk is paused or held".into(),
                )))
            }
        };
        inner.gate = Gate::Draining(img.clone());
        while inner.in_flight > 0 {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        Ok(img)
    }

    /// End a [`Disk::hold`]: serve `next` (a new image of the same size)
    /// or, with `None`, `old` again, and release the held requests.
    pub fn release(&self, old: Arc<dyn Image>, next: Option<Arc<dyn Image>>) {
        let mut inner = self.lock();
        if matches!(inner.gate, Gate::Draining(_)) {
            let img = match next {
                Some(img) if img.virtual_size() == self.size() => {
                    inner.generation += 1;
                    img
                }
                _ => old,
            };
            self.read_only.store(img.read_only(), Relaxed);
            inner.gate = Gate::Open(img);
        }
        self.changed.notify_all();
    }

    /// Run `f` with no request in flight and none admitted meanwhile
    /// (they wait, as while paused), then reopen the gate on the same
    /// image. A paused or closed disk has nothing in flight: `f` just runs.
    /// For changes that must not interleave with a write, such as a CBT
    /// checkpoint.
    pub fn quiesced<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut inner = self.lock();
        let img = match std::mem::replace(&mut inner.gate, Gate::Paused) {
            Gate::Open(img) => img,
            other => {
                inner.gate = other;
                drop(inner);
                return f();
            }
        };
        inner.gate = Gate::Draining(img.clone());
        while inner.in_flight > 0 {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        // Requests arriving now wait on the Draining gate, not the lock.
        drop(inner);
        let out = f();
        let mut inner = self.lock();
        inner.gate = Gate::Open(img);
        self.changed.notify_all();
        out
    }

    /// Drain, flush and close for good; later requests fail with EIO.
    pub fn close(&self) -> Result<(), DiskError> {
        // A request sleeping for its throttle slot is not in flight, so the
        // drain does not wait for it; it is woken only once the gate is
        // closed, and fails. (Woken before the drain, it could still slip
        // in and run after `close` had begun.)
        let paused = self.pause();
        let mut inner = self.lock();
        inner.gate = Gate::Closed;
        self.changed.notify_all();
        drop(inner);
        self.throttle.interrupt();
        match paused {
            Err(DiskError::Closed) => Ok(()),
            other => other,
        }
    }
}
