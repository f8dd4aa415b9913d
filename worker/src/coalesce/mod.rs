//! Online coalesce, the worker's half (qemu's block-stream and
//! block-commit while the disk serves).
//!
//! `Start` wraps the served image in [`guard::Merging`] and starts the
//! background copy ([`job`]); `Hold` holds I/O, copies what the guest
//! wrote since (commit) or drops the parent from the leaf's footers
//! (stream), and makes the written file durable; the broker then records
//! the new chain, and `Switch` serves it. Until `Switch` the old chain is
//! intact and complete: a stream only fills sectors the leaf lacked with
//! the parent's own bytes, a commit only writes into the parent sectors
//! the leaf overrides. A worker killed anywhere leaves a chain that reads
//! as the disk did.

mod control;
pub mod guard;
pub mod job;
#[cfg(test)]
mod tests;

use crate::disk::{Disk, IoKind};
use crate::image::vhd::{self, online, VhdImage, VhdLayer, VhdOptions};
use crate::image::{Image, ImageError, ParentOpener};
use crate::io::{CacheMode, UringFile};
use guard::{Guards, Merging};
use job::Progress;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tapjail_common::coalesce::{CoalesceReply, CoalesceState, Direction, DEFAULT_RATE};

/// The file a merge writes, besides the served chain.
#[derive(Debug)]
enum Target {
    /// The leaf again (read-write), to drop its parent and reopen it.
    Stream(Option<UringFile>),
    /// The parent, opened writable with its own parents: the new chain.
    Commit(Arc<VhdImage>),
}

/// A merge, from `Start` until the next one (its stats stay visible).
#[derive(Debug)]
pub struct Job {
    disk: Arc<Disk>,
    /// The image served before the merge (what `Merging` wraps).
    inner: Arc<dyn Image>,
    guards: Arc<Guards>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
    target: Target,
    name: String,
    /// While held: the image served (the `Merging` wrapper) and since when.
    held: Option<(Arc<dyn Image>, Instant)>,
    switched: bool,
    chain: Vec<String>,
    stall_us: u64,
}

fn bad(msg: impl Into<String>) -> ImageError {
    ImageError::InvalidArgument(msg.into())
}

fn uring(fd: OwnedFd, cache: CacheMode) -> Result<UringFile, ImageError> {
    UringFile::new(fd, cache).map_err(|source| ImageError::Io {
        op: "setting up the merge's file",
        offset: 0,
        source,
    })
}

/// What `Start` checks on the served chain: layers, the parent's UUID.
fn inspect(disk: &Disk, direction: Direction) -> Result<(usize, [u8; 16], [u8; 16]), ImageError> {
    disk.io(IoKind::Other, 0, |img| {
        let v = img.vhd().ok_or_else(|| {
            bad("the disk does not serve a plain VHD chain (a raw image, or one that mirrors)")
        })?;
        if let Some(why) = online::refusal(v) {
            return Err(bad(why));
        }
        let layers = v.layers();
        if direction == Direction::Stream && layers.len() > 2 {
            return Err(bad(format!(
                "{} has a parent of its own: streaming into a leaf that keeps a grandparent is \
                 not built; use --commit, or coalesce the parents first",
                layers[1].name()
            )));
        }
        if layers[1].virtual_size() < layers[0].virtual_size() && direction == Direction::Commit {
            return Err(bad(format!(
                "the parent {} is smaller than the disk: resize it first",
                layers[1].name()
            )));
        }
        Ok((layers.len(), layers[0].uuid(), layers[1].uuid()))
    })
    .map_err(|e| match e {
        crate::disk::DiskError::Image(e) => e,
        other => bad(other.to_string()),
    })
}

impl Job {
    /// Check the chain, open the written file (a commit's parents through
    /// `parents`, as for `Open`), wrap the served image and start copying.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        disk: &Arc<Disk>,
        direction: Direction,
        name: &str,
        rate: u64,
        file: OwnedFd,
        cache: CacheMode,
        parents: &mut dyn ParentOpener,
    ) -> Result<Job, ImageError> {
        let (_, leaf_uuid, parent_uuid) = inspect(disk, direction)?;
        let file = uring(file, cache)?;
        let target = match direction {
            Direction::Stream => {
                let meta = vhd::layout::Metadata::read(&file)?;
                if meta.footer.uuid() != leaf_uuid {
                    return Err(bad(format!("{name} is not the served leaf")));
                }
                Target::Stream(Some(file))
            }
            Direction::Commit => {
                let dst = vhd::open(Box::new(file), name, false, parents, VhdOptions::default())?;
                if dst.leaf().uuid() != parent_uuid {
                    return Err(bad(format!("{name} is not the served leaf's parent")));
                }
                if dst.layers().iter().any(|l| l.cipher().is_some()) {
                    return Err(bad(format!("{name}'s chain is encrypted")));
                }
                Target::Commit(Arc::new(dst))
            }
        };
        let inner = disk.hold().map_err(|e| bad(e.to_string()))?;
        let guards = Arc::new(Guards::new(disk.size()));
        let wrapped: Arc<dyn Image> = Arc::new(Merging {
            inner: inner.clone(),
            guards: guards.clone(),
        });
        disk.release(inner.clone(), Some(wrapped));
        let progress = Arc::new(Progress::new(direction, guards.chunks()));
        let dst = match &target {
            Target::Commit(d) => Some(d.clone()),
            Target::Stream(_) => None,
        };
        let rate = if rate == 0 { DEFAULT_RATE } else { rate };
        let spawned = {
            let (disk, guards, progress) = (disk.clone(), guards.clone(), progress.clone());
            crate::frontend::spawn_thread("coalesce", move || {
                job::run(disk, guards, progress, dst, rate)
            })
        };
        let mut job = Job {
            disk: disk.clone(),
            inner,
            guards,
            progress,
            thread: None,
            target,
            name: name.to_string(),
            held: None,
            switched: false,
            chain: Vec::new(),
            stall_us: 0,
        };
        match spawned {
            Ok(t) => job.thread = Some(t),
            Err(e) => {
                job.progress.set(
                    CoalesceState::Failed,
                    Some(format!("starting the copy: {e}")),
                );
                return Err(bad(format!("starting the copy thread: {e}")));
            }
        }
        tracing::info!(direction = %direction, target = %name, "coalesce started");
        Ok(job)
    }

    /// Whether the merge still holds the disk (not switched, not failed).
    pub fn active(&self) -> bool {
        !self.switched
            && !matches!(
                self.progress.state(),
                CoalesceState::Failed | CoalesceState::Done
            )
    }

    pub fn reply(&self) -> CoalesceReply {
        CoalesceReply {
            stats: self.progress.stats(),
            chain: self.chain.clone(),
            stall_us: self.stall_us,
        }
    }

    /// The file written (as `Start` named it).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> tapjail_common::coalesce::CoalesceStats {
        self.progress.stats()
    }

    pub fn wait(&self) {
        self.progress.wait(std::time::Duration::from_millis(100));
    }

    /// Hold I/O and make the new chain complete and durable.
    pub fn hold(&mut self) -> Result<(), ImageError> {
        if self.held.is_some() {
            return Ok(());
        }
        if self.progress.state() != CoalesceState::Copied {
            return Err(bad(format!(
                "the copy is {}, not finished",
                self.progress.state().as_str()
            )));
        }
        let at = Instant::now();
        let img = self.disk.hold().map_err(|e| bad(e.to_string()))?;
        let done = self.finish_held(img.as_ref());
        match done {
            Ok(()) => {
                self.held = Some((img, at));
                self.progress.set(CoalesceState::Held, None);
                Ok(())
            }
            Err(e) => {
                self.disk.release(img, None);
                Err(e)
            }
        }
    }

    fn finish_held(&mut self, img: &dyn Image) -> Result<(), ImageError> {
        img.flush()?;
        let v = img
            .vhd()
            .ok_or_else(|| bad("the disk no longer serves a VHD chain"))?;
        match &self.target {
            Target::Stream(file) => {
                let file = file.as_ref().ok_or_else(|| bad("the leaf is gone"))?;
                online::detach_parent(file)
            }
            Target::Commit(dst) => {
                let mut buf = Vec::new();
                for c in 0..self.guards.chunks() {
                    if self.guards.take_dirty(c) {
                        let n = job::step(v, &self.guards, Some(dst), c, &mut buf)?;
                        self.progress.copied.fetch_add(n, Ordering::Relaxed);
                    }
                }
                dst.flush()
            }
        }
    }

    /// Serve the new chain (wrapped by `wrap`) and release I/O.
    pub fn switch(
        &mut self,
        wrap: impl FnOnce(Arc<dyn Image>) -> Arc<dyn Image>,
    ) -> Result<(), ImageError> {
        let Some((held, at)) = self.held.take() else {
            return Err(bad("Switch before Hold"));
        };
        let built: Result<Arc<dyn Image>, ImageError> = match &mut self.target {
            Target::Stream(file) => match file.take() {
                None => Err(bad("the leaf is gone")),
                Some(f) => VhdLayer::open(Box::new(f), &self.name, false, VhdOptions::default())
                    .and_then(|l| VhdImage::from_layers(vec![l]))
                    .map(|i| Arc::new(i) as Arc<dyn Image>),
            },
            Target::Commit(dst) => Ok(dst.clone() as Arc<dyn Image>),
        };
        match built {
            Ok(img) if img.virtual_size() == self.disk.size() => {
                let img = wrap(img);
                self.chain = img.stats().into_iter().map(|l| l.name).collect();
                self.disk.release(held, Some(img));
                self.stall_us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.switched = true;
                self.progress.set(CoalesceState::Done, None);
                tracing::info!(chain = ?self.chain, stall_us = self.stall_us, "coalesce switched");
                Ok(())
            }
            Ok(_) => {
                self.disk.release(held, None);
                Err(bad("the new chain has another size"))
            }
            Err(e) => {
                self.disk.release(held, None);
                Err(e)
            }
        }
    }

    /// Stop copying and serve the old chain unwrapped.
    pub fn abort(&mut self) {
        self.progress.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.switched {
            return;
        }
        let img = match self.held.take() {
            Some((img, _)) => Some(img),
            None => self.disk.hold().ok(),
        };
        if let Some(img) = img {
            self.disk.release(img, Some(self.inner.clone()));
        }
        if self.progress.state() != CoalesceState::Failed {
            self.progress
                .set(CoalesceState::Failed, Some("aborted".into()));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.abort();
    }
}
