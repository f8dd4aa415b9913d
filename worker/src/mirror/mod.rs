//! Mirroring a disk's writes to a secondary NBD target, blktap's `-2 URI`
//! (see `tapjail_common::mirror` for the URI forms and modes); a file
//! secondary (`-2 vhd:PATH`) is [`file`]'s.
//!
//! The broker connects and hands the socket over ([`ToWorker::Mirror`]);
//! the worker negotiates ([`client`]), and the next `Open` or `Unpause`
//! wraps the opened chain in a [`Mirrored`] image:
//!
//! - mirror mode: every write goes to the primary, then to the secondary,
//!   and is acknowledged when both have it; a background copy
//!   ([`copy`]) brings over what the primary held before;
//! - standby: writes go to the primary until it answers ENOSPC; from then
//!   on the secondary serves everything (blktap's failover);
//! - a secondary that errs, times out (the broker set the socket's
//!   timeouts) or goes away fails the mirror, never the guest: the primary
//!   keeps serving, and `stats` says `nbd_mirror_failed` (as blktap).
//!
//! A synced mirror can become the disk itself: `unpause -2` after `pause`
//! serves from the secondary ([`Secondary`]).
//!
//! [`ToWorker::Mirror`]: tapjail_common::worker_proto::ToWorker::Mirror

pub mod client;
pub mod copy;
pub mod file;
pub mod fill;
mod secondary;
mod slot;

pub use secondary::Secondary;
pub use slot::MirrorSlot;

use crate::image::{DirectFile, Extent, Image, ImageError, LayerStats, Mapping};
pub(crate) use client::{ClientError, NbdClient};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use tapjail_common::mirror::{MirrorMode, MirrorState, MirrorStats};

/// Bytes per background copy step (guest writes wait at most one step);
/// small, as the worker's memory is locked and budgeted.
pub const COPY_CHUNK: u64 = 64 * 1024;

/// The connection to the secondary and what became of it.
#[derive(Debug)]
pub struct Mirror {
    uri: String,
    mode: MirrorMode,
    size: u64,
    /// `None` once the mirror failed.
    client: Mutex<Option<NbdClient<File>>>,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    copied: AtomicU64,
    synced: AtomicBool,
    failed_over: AtomicBool,
    mirrored_writes: AtomicU64,
    /// Guest writes hold it shared, a copy step exclusively: a step reads
    /// the primary and writes the secondary with no guest write between.
    gate: RwLock<()>,
    /// The copy buffer, allocated at connect time: before the frontend
    /// sizes its own buffers to what the locked-memory budget has left.
    buf: Mutex<Vec<u8>>,
    _claim: crate::sandbox::mlock::Claim,
}

/// Locked memory a mirror needs: its buffer, the copy thread's stack and
/// its overhead.
const LOCKED_COST: u64 = COPY_CHUNK + copy::COPY_STACK as u64 + 32 * 1024;

/// A positioned write to the secondary, as the caller performs it.
type WriteAt<'a> = dyn FnMut(&[u8], u64) -> Result<(), ImageError> + 'a;

/// Zeroes to write from (static: no allocation under locked memory).
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl Mirror {
    /// Negotiate on `sock`, the connection the broker made to `uri`.
    pub fn connect(sock: File, uri: String, mode: MirrorMode) -> Result<Arc<Mirror>, ClientError> {
        let client = NbdClient::handshake(sock, "")?;
        Ok(Arc::new(Mirror {
            uri,
            mode,
            size: client.export.size,
            client: Mutex::new(Some(client)),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            copied: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            failed_over: AtomicBool::new(false),
            mirrored_writes: AtomicU64::new(0),
            gate: RwLock::new(()),
            buf: Mutex::new(vec![0; COPY_CHUNK as usize]),
            _claim: crate::sandbox::mlock::claim(LOCKED_COST),
        }))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn mode(&self) -> MirrorMode {
        self.mode
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    /// Everything the primary holds, the secondary holds (mirror mode).
    pub fn synced(&self) -> bool {
        self.synced.load(Relaxed) && !self.failed()
    }

    /// Stop mirroring for `why`: the secondary is dropped, the primary
    /// keeps serving. Said once on the worker's log.
    pub fn fail(&self, why: &str) {
        if self.failed.swap(true, Relaxed) {
            return;
        }
        tapjail_common::log_line!(
            "tapdisk: mirror to {} failed: {why}; the primary keeps serving",
            self.uri
        );
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        if let Ok(mut c) = self.client.try_lock() {
            *c = None;
        }
    }

    /// Run `f` on the connection; a failure fails the mirror. `false`
    /// when the mirror has failed (now or before).
    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut NbdClient<File>) -> Result<T, ClientError>,
    ) -> Option<T> {
        if self.failed() {
            return None;
        }
        let mut g = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let c = g.as_mut()?;
        match f(c) {
            Ok(v) => Some(v),
            Err(e) => {
                *g = None;
                drop(g);
                self.fail(&format!("{what}: {e}"));
                None
            }
        }
    }

    /// Send a guest write's bytes to the secondary.
    fn mirror_write(&self, buf: &[u8], offset: u64) {
        if self.with("writing", |c| c.write_at(buf, offset)).is_some() {
            self.mirrored_writes.fetch_add(1, Relaxed);
        }
    }

    /// Bring `[offset, offset+len)` over from `primary` (after a discard
    /// or write-zeroes, whose result the primary defines).
    fn copy_range(&self, primary: &dyn Image, offset: u64, len: u64) {
        let mut off = offset;
        let end = offset.saturating_add(len).min(self.size);
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        while off < end && !self.failed() {
            let n = (end - off).min(COPY_CHUNK) as usize;
            let buf = &mut buf[..n];
            if let Err(e) = primary.read_at(buf, off) {
                self.fail(&format!("reading the primary at {off} to mirror it: {e}"));
                return;
            }
            if self.with("writing", |c| c.write_at(buf, off)).is_none() {
                return;
            }
            off += n as u64;
        }
    }

    /// Write zeroes over `[offset, offset+len)` of the secondary.
    fn zero_secondary(
        &self,
        offset: u64,
        len: u64,
        io: &mut WriteAt<'_>,
    ) -> Result<(), ImageError> {
        let end =
            offset
                .checked_add(len)
                .filter(|e| *e <= self.size)
                .ok_or(ImageError::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                })?;
        let mut off = offset;
        while off < end {
            let n = (end - off).min(ZEROES.len() as u64) as usize;
            io(&ZEROES[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    pub fn stats(&self) -> MirrorStats {
        let state = if self.failed() {
            MirrorState::Failed
        } else if self.failed_over.load(Relaxed) {
            MirrorState::FailedOver
        } else {
            match self.mode {
                MirrorMode::Standby => MirrorState::Standby,
                MirrorMode::Mirror if self.synced.load(Relaxed) => MirrorState::Synced,
                MirrorMode::Mirror => MirrorState::Copying,
            }
        };
        MirrorStats {
            uri: self.uri.clone(),
            mode: self.mode,
            state,
            copied: self.copied.load(Relaxed),
            total: self.size,
            mirrored_writes: self.mirrored_writes.load(Relaxed),
            error: self.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Leave the secondary politely (close, or a switch that dropped it).
    pub fn disconnect(&self) {
        if let Some(mut c) = self.client.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.disconnect();
        }
    }
}

/// A primary chain with its writes mirrored.
#[derive(Debug)]
pub struct Mirrored {
    primary: Arc<dyn Image>,
    mirror: Arc<Mirror>,
}

impl Mirrored {
    /// Wrap `primary`; the sizes must match (as blktap checks). In mirror
    /// mode the background copy starts on its own thread.
    pub fn wrap(primary: Arc<dyn Image>, mirror: Arc<Mirror>) -> Result<Arc<Mirrored>, ImageError> {
        if primary.virtual_size() != mirror.size {
            return Err(ImageError::InvalidArgument(format!(
                "the secondary {} has {} bytes, the image {}: a mirror needs the same size",
                mirror.uri,
                mirror.size,
                primary.virtual_size()
            )));
        }
        if primary.read_only() {
            return Err(ImageError::InvalidArgument(
                "a read-only (-R) disk has no writes to mirror".into(),
            ));
        }
        let m = Arc::new(Mirrored { primary, mirror });
        if m.mirror.mode == MirrorMode::Mirror {
            copy::start(&m).map_err(|e| ImageError::Io {
                op: "starting the mirror copy thread",
                offset: 0,
                source: e,
            })?;
        }
        Ok(m)
    }

    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    fn over(&self) -> bool {
        self.mirror.failed_over.load(Relaxed)
    }

    /// Standby failover: the secondary serves from now on.
    fn secondary_io<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut NbdClient<File>) -> Result<T, ClientError>,
    ) -> Result<T, ImageError> {
        let mut g = self.mirror.client.lock().unwrap_or_else(|e| e.into_inner());
        let c = g.as_mut().ok_or_else(|| ImageError::Io {
            op: what,
            offset: 0,
            source: std::io::Error::other(format!("the secondary {} is gone", self.mirror.uri)),
        })?;
        f(c).map_err(|e| ImageError::Io {
            op: what,
            offset: 0,
            source: std::io::Error::other(e.to_string()),
        })
    }
}

impl Image for Mirrored {
    fn virtual_size(&self) -> u64 {
        self.primary.virtual_size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        if self.over() {
            return self.secondary_io("reading the secondary", |c| c.read_at(buf, offset));
        }
        self.primary.read_at(buf, offset)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        !self.over() && self.primary.read_at_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        if self.over() {
            return self.secondary_io("writing the secondary", |c| c.write_at(buf, offset));
        }
        match self.mirror.mode {
            MirrorMode::Mirror => {
                let _shared = self.mirror.gate.read().unwrap_or_else(|e| e.into_inner());
                self.primary.write_at(buf, offset)?;
                self.mirror.mirror_write(buf, offset);
                Ok(())
            }
            MirrorMode::Standby => match self.primary.write_at(buf, offset) {
                Err(ImageError::NoSpace(why)) if !self.mirror.failed() => {
                    tapjail_common::log_line!(
                        "tapdisk: the primary is full ({why}): failing over to the standby {}",
                        self.mirror.uri
                    );
                    self.mirror.failed_over.store(true, Relaxed);
                    self.secondary_io("writing the secondary", |c| c.write_at(buf, offset))
                }
                other => other,
            },
        }
    }

    fn flush(&self) -> Result<(), ImageError> {
        if self.over() {
            return self.secondary_io("flushing the secondary", |c| c.flush());
        }
        self.primary.flush()?;
        if self.mirror.mode == MirrorMode::Mirror {
            self.mirror.with("flushing", |c| c.flush());
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        if self.over() {
            return Ok(());
        }
        let _shared = self.mirror.gate.read().unwrap_or_else(|e| e.into_inner());
        self.primary.discard(offset, len)?;
        if self.mirror.mode == MirrorMode::Mirror {
            self.mirror.copy_range(self.primary.as_ref(), offset, len);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        if self.over() {
            return self.mirror.zero_secondary(offset, len, &mut |z, off| {
                self.secondary_io("writing the secondary", |c| c.write_at(z, off))
            });
        }
        let _shared = self.mirror.gate.read().unwrap_or_else(|e| e.into_inner());
        self.primary.write_zeroes(offset, len, may_unmap)?;
        if self.mirror.mode == MirrorMode::Mirror {
            self.mirror.copy_range(self.primary.as_ref(), offset, len);
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.primary.block_status(offset, len)
    }

    fn stats(&self) -> Vec<LayerStats> {
        self.primary.stats()
    }

    // Reads may take the primary's direct path; writes never do (they
    // must reach the secondary too), nor anything after a failover.
    fn direct_files(&self) -> Vec<DirectFile> {
        self.primary.direct_files()
    }

    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<Mapping> {
        if write || self.over() {
            return None;
        }
        self.primary.map_direct(offset, len, false)
    }

    fn direct_done(&self, mapping: &Mapping, ok: bool) {
        self.primary.direct_done(mapping, ok);
    }
}
