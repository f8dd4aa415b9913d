//! The merge job: one background thread that walks the disk chunk by
//! chunk, each step admitted through the disk's gate like a request (so
//! a hold or a close waits for one step, not the whole merge) and paced
//! so that the guest's I/O keeps the disk.

use super::guard::{Guards, CHUNK};
use crate::disk::{Disk, IoKind};
use crate::image::vhd::{online, VhdImage};
use crate::image::ImageError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tapjail_common::coalesce::{CoalesceState, CoalesceStats, Direction, MAX_ERROR_LEN};

/// Commit passes over chunks the guest dirtied, before the final one
/// (under the hold) copies what is left.
const DIRTY_PASSES: usize = 4;

/// What the job and the control thread share.
#[derive(Debug)]
pub struct Progress {
    pub direction: Direction,
    pub total: u64,
    pub done: AtomicU64,
    pub copied: AtomicU64,
    pub stop: AtomicBool,
    state: Mutex<(CoalesceState, Option<String>)>,
    changed: Condvar,
}

impl Progress {
    pub fn new(direction: Direction, total: u64) -> Progress {
        Progress {
            direction,
            total,
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            state: Mutex::new((CoalesceState::Copying, None)),
            changed: Condvar::new(),
        }
    }

    pub fn set(&self, state: CoalesceState, error: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = (
            state,
            error.map(|e| e.chars().take(MAX_ERROR_LEN).collect()),
        );
        self.changed.notify_all();
    }

    pub fn state(&self) -> CoalesceState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Wait up to `limit` for the copy to leave `Copying`.
    pub fn wait(&self, limit: Duration) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(s, limit, |s| s.0 == CoalesceState::Copying);
    }

    pub fn stats(&self) -> CoalesceStats {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        CoalesceStats {
            direction: self.direction,
            state: s.0,
            done: self.done.load(Ordering::Relaxed),
            total: self.total,
            copied_bytes: self.copied.load(Ordering::Relaxed),
            error: s.1.clone(),
        }
    }
}

/// One copy step of chunk `c` on the served chain `v`.
pub fn step(
    v: &VhdImage,
    guards: &Guards,
    dst: Option<&VhdImage>,
    c: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, ImageError> {
    let off = c * CHUNK;
    match dst {
        None => {
            let _held = guards.exclusive(c);
            online::stream_range(v, off, CHUNK, buf)
        }
        Some(d) => {
            guards.take_dirty(c);
            online::commit_range(v.leaf(), d.leaf(), off, CHUNK, buf)
        }
    }
}

/// The thread's body: copy everything, then (commit) chase the guest's
/// writes a few times; leaves `Copied`, or `Failed` with the reason.
pub fn run(
    disk: Arc<Disk>,
    guards: Arc<Guards>,
    progress: Arc<Progress>,
    dst: Option<Arc<VhdImage>>,
    rate: u64,
) {
    let started = Instant::now();
    let mut buf = Vec::new();
    let one = |c: u64, buf: &mut Vec<u8>| -> Result<(), String> {
        let n = disk
            .io(IoKind::Other, 0, |img| {
                let v = img.vhd().ok_or_else(|| {
                    ImageError::InvalidArgument("the disk no longer serves a VHD chain".into())
                })?;
                step(v, &guards, dst.as_deref(), c, buf)
            })
            .map_err(|e| format!("copying at {}: {e}", c * CHUNK))?;
        let copied = progress.copied.fetch_add(n, Ordering::Relaxed) + n;
        // Pace: never ahead of `rate` bytes per second since the start.
        let due = Duration::from_secs_f64(copied as f64 / rate.max(1) as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
        std::thread::yield_now();
        Ok(())
    };
    let mut result = Ok(());
    'all: for c in 0..guards.chunks() {
        if progress.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = one(c, &mut buf) {
            result = Err(e);
            break 'all;
        }
        progress.done.store(c + 1, Ordering::Relaxed);
    }
    if result.is_ok() && dst.is_some() {
        for _ in 0..DIRTY_PASSES {
            let mut again = 0;
            for c in 0..guards.chunks() {
                if progress.stop.load(Ordering::Relaxed) {
                    return;
                }
                if guards.take_dirty(c) {
                    again += 1;
                    if let Err(e) = one(c, &mut buf) {
                        result = Err(e);
                        break;
                    }
                }
            }
            if again == 0 || result.is_err() {
                break;
            }
        }
    }
    match result {
        Ok(()) => progress.set(CoalesceState::Copied, None),
        Err(e) => progress.set(CoalesceState::Failed, Some(e)),
    }
}
