//! A file secondary (`-2 vhd:PATH` / `-2 aio:PATH`), as blktap's
//! `tapdisk_vbd_add_secondary` treats one: SM's IntelliCache leaf call
//! passes the VM's VDI on the shared SR this way, with the local leaf as
//! the image.
//!
//! - Mirror mode: every guest write goes to the leaf and to the
//!   secondary and is acknowledged when both have it; reads go leaf →
//!   secondary → the leaf's parents, because the secondary "may already
//!   contain data" (the VDI's earlier boots). There is no background
//!   copy: the secondary is the disk of record. When the leaf runs out of
//!   space it is retired and the disk goes on with the secondary alone
//!   (over the leaf's parents): the write that hit ENOSPC is written to
//!   the secondary, so nothing is lost.
//! - Standby (`-s`): the secondary is neither read nor written until the
//!   leaf runs out of space; then it is put in front of the leaf and
//!   takes every write from then on.
//!
//! - `-r` on the leaf (leaf mode, [`super::fill`]): in mirror mode, what a
//!   read brings up from below the leaf is written back into the leaf.
//!
//! The secondary is opened alone (not its own parents, as blktap does)
//! and read with [`tapjail_image::vhd::stack`] over what lies below it.
//! Unlike an NBD secondary, its errors are the guest's: it is the VDI.

use super::fill::Fill;
use super::MirrorMode;
use crate::image::vhd::layer::{VhdLayer, VhdOptions};
use crate::image::vhd::stack::{read_own_then, Below};
use crate::image::vhd::VhdImage;
use crate::image::{raw::RawImage, Extent, Image, ImageError, LayerStats, SECTOR_SIZE};
use crate::io::{CacheMode, UringFile};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use tapjail_common::mirror::{MirrorState, MirrorStats};
use tapjail_common::proto::ImageKind;

/// What the broker handed over for the next `Open`/`Unpause`.
#[derive(Debug)]
pub struct PendingFile {
    pub uri: String,
    pub kind: ImageKind,
    pub mode: MirrorMode,
    pub file: OwnedFd,
    pub cache: CacheMode,
    /// `-r` on this leaf: copy-on-read into it ([`super::fill`]).
    pub fill: bool,
}

/// Where the disk stands with its file secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Writes to both; reads leaf → secondary → parents.
    Mirroring = 0,
    /// Standby: the leaf alone until it is full.
    Standby = 1,
    /// Mirror mode after the leaf's ENOSPC: secondary → parents.
    Retired = 2,
    /// Standby after the leaf's ENOSPC: secondary → leaf → parents.
    FailedOver = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Mirroring,
            1 => Phase::Standby,
            2 => Phase::Retired,
            _ => Phase::FailedOver,
        }
    }
}

/// A file mirror's state, kept by the slot for `stats`.
#[derive(Debug)]
pub struct FileMirror {
    uri: String,
    mode: MirrorMode,
    size: u64,
    phase: AtomicU8,
    mirrored_writes: AtomicU64,
    error: Mutex<Option<String>>,
    /// Leaf-mode `-r` (mirror mode over a VHD leaf only).
    fill: Option<Fill>,
}

impl FileMirror {
    /// Leaf-mode `-r` counters, for `stats` (`read_cache`).
    pub fn fill_stats(&self) -> Option<tapjail_common::read_cache::ReadCacheStats> {
        self.fill.as_ref().map(Fill::stats)
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Relaxed))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn stats(&self) -> MirrorStats {
        let state = match self.phase() {
            Phase::Mirroring => MirrorState::Mirroring,
            Phase::Standby => MirrorState::Standby,
            Phase::Retired | Phase::FailedOver => MirrorState::FailedOver,
        };
        MirrorStats {
            uri: self.uri.clone(),
            mode: self.mode,
            state,
            copied: 0,
            total: self.size,
            mirrored_writes: self.mirrored_writes.load(Relaxed),
            error: self.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// The leaf is full: move on to the secondary (once). In mirror mode
    /// the retired leaf is emptied in place (`VhdLayer::empty_in_place`):
    /// the secondary has every write it has, and a respawned tapdisk that
    /// opens the leaf again must read through it, not its stale sectors.
    /// `gate` held exclusively: no write is still under way on the leaf.
    fn leaf_full(&self, why: &ImageError, primary: &dyn Image) {
        let (from, to, what) = match self.mode {
            MirrorMode::Mirror => (
                Phase::Mirroring,
                Phase::Retired,
                "retiring it: the secondary serves alone",
            ),
            MirrorMode::Standby => (
                Phase::Standby,
                Phase::FailedOver,
                "failing over: the secondary takes every write",
            ),
        };
        if self
            .phase
            .compare_exchange(from as u8, to as u8, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        tapjail_common::log_line!(
            "tapdisk: the leaf is out of space ({why}); {what} ({})",
            self.uri
        );
        let mut error = format!("the leaf ran out of space: {why}");
        if to == Phase::Retired {
            if let Some(Err(e)) = primary.vhd().map(|v| v.leaf().empty_in_place()) {
                tapjail_common::log_line!(
                    "tapdisk: emptying the retired leaf failed: {e}; a reopen of it would read \
                     its stale sectors: do not reopen it"
                );
                error.push_str(&format!("; emptying it failed: {e}"));
            }
        }
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// The leaf chain with its file secondary.
#[derive(Debug)]
pub struct FileMirrored {
    primary: Arc<dyn Image>,
    secondary: Arc<dyn Image>,
    state: Arc<FileMirror>,
    /// Serializes the read-modify-write of partial sectors (done here,
    /// over the whole stack, not by either image: a lone differencing
    /// secondary would merge a partial sector with zeroes).
    rmw: Mutex<()>,
    /// Writes hold it shared; the move off a full leaf exclusively, so no
    /// write is still under way on the leaf when it is retired.
    gate: RwLock<()>,
}

/// Whether a lone VHD secondary has any sector of its own.
fn holds_data(img: &dyn Image) -> Result<bool, ImageError> {
    let size = img.virtual_size();
    let mut off = 0;
    while off < size {
        let e = img.block_status(off, size - off)?;
        if e.allocated {
            return Ok(true);
        }
        off += e.len.max(1);
    }
    Ok(false)
}

fn no_space(e: &ImageError) -> bool {
    matches!(e.errno(), libc::ENOSPC | libc::EDQUOT)
}

impl FileMirrored {
    /// Open `p`'s file and stack it with `primary`; the sizes must match
    /// (as blktap checks).
    pub fn wrap(
        primary: Arc<dyn Image>,
        p: PendingFile,
    ) -> Result<(Arc<FileMirrored>, Arc<FileMirror>), ImageError> {
        if primary.read_only() {
            return Err(ImageError::InvalidArgument(
                "a read-only (-R) disk has no writes to mirror".into(),
            ));
        }
        if let Some(v) = primary.vhd() {
            if v.layers().iter().any(|l| l.cipher().is_some()) {
                return Err(ImageError::InvalidArgument(format!(
                    "-2 {}: a file secondary with an encrypted (-E) chain is not supported",
                    p.uri
                )));
            }
        }
        let file = UringFile::new(p.file, p.cache).map_err(|source| ImageError::Io {
            op: "setting up the secondary's file",
            offset: 0,
            source,
        })?;
        let name = p.uri.clone();
        let secondary: Arc<dyn Image> = match p.kind {
            ImageKind::Vhd => {
                let layer = VhdLayer::open(Box::new(file), &name, false, VhdOptions::default())?;
                if layer.cipher().is_some() || layer.encrypted() {
                    return Err(ImageError::InvalidArgument(format!(
                        "-2 {name}: the secondary is encrypted; not supported"
                    )));
                }
                Arc::new(VhdImage::from_layers(vec![layer])?)
            }
            ImageKind::Aio if p.mode == MirrorMode::Standby => {
                return Err(ImageError::InvalidArgument(format!(
                    "-2 {name} -s: a raw secondary cannot stand by: after the failover it is \
                     read in front of the leaf, and its every sector would hide the leaf's data; \
                     use a VHD secondary"
                )))
            }
            ImageKind::Aio => Arc::new(RawImage::open(Box::new(file), &name, false)?),
        };
        if secondary.virtual_size() != primary.virtual_size() {
            return Err(ImageError::InvalidArgument(format!(
                "-2 {name}: the secondary has {} bytes, the image {}: a secondary must have \
                 the image's virtual size",
                secondary.virtual_size(),
                primary.virtual_size()
            )));
        }
        // blktap never reads a standby secondary before the failover, and
        // puts it in front of the leaf after: one holding data has taken
        // over before (a tapdisk that failed over, then died), so it is
        // in front again, or those writes would be lost.
        let phase = match p.mode {
            MirrorMode::Mirror => Phase::Mirroring,
            MirrorMode::Standby if holds_data(secondary.as_ref())? => Phase::FailedOver,
            MirrorMode::Standby => Phase::Standby,
        };
        let state = Arc::new(FileMirror {
            uri: p.uri,
            mode: p.mode,
            size: primary.virtual_size(),
            phase: AtomicU8::new(phase as u8),
            mirrored_writes: AtomicU64::new(0),
            error: Mutex::new(None),
            fill: (p.fill && p.mode == MirrorMode::Mirror && primary.vhd().is_some())
                .then(Fill::default),
        });
        Ok((
            Arc::new(FileMirrored {
                primary,
                secondary,
                state: state.clone(),
                rmw: Mutex::new(()),
                gate: RwLock::new(()),
            }),
            state,
        ))
    }

    /// The leaf's parents (zeroes under a raw leaf, which has none).
    fn parents(&self, buf: &mut [u8], off: u64) -> Result<(), ImageError> {
        match self.primary.vhd() {
            Some(p) => p.read_parents(buf, off),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The secondary's own sectors over `below`.
    fn secondary_over(
        &self,
        buf: &mut [u8],
        off: u64,
        below: &mut Below<'_>,
    ) -> Result<(), ImageError> {
        match self.secondary.vhd() {
            Some(s) => read_own_then(s, buf, off, below),
            None => self.secondary.read_at(buf, off),
        }
    }

    /// Run a write-like `op` on the images the phase says, moving on when
    /// the leaf is full; acknowledged only when every image written has it.
    fn write_with(
        &self,
        offset: u64,
        len: u64,
        op: &dyn Fn(&dyn Image) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let full = {
            let _shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
            match self.state.phase() {
                Phase::Retired | Phase::FailedOver => return op(self.secondary.as_ref()),
                Phase::Mirroring | Phase::Standby => {}
            }
            // A fill racing this write waits, or is overwritten by it.
            let on_leaf = self.state.fill.as_ref().map(|f| f.lock(offset, len));
            let leaf = op(self.primary.as_ref());
            drop(on_leaf);
            match leaf {
                Ok(()) => {
                    if self.state.mode == MirrorMode::Mirror {
                        op(self.secondary.as_ref()).inspect_err(|e| {
                            *self.state.error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(format!("writing the secondary: {e}"));
                        })?;
                        self.state.mirrored_writes.fetch_add(1, Relaxed);
                    }
                    return Ok(());
                }
                Err(e) if no_space(&e) => e,
                Err(e) => return Err(e),
            }
        };
        {
            let _alone = self.gate.write().unwrap_or_else(|p| p.into_inner());
            self.state.leaf_full(&full, self.primary.as_ref());
        }
        op(self.secondary.as_ref())
    }

    /// `[offset, offset+len)` widened to whole sectors, or `None` if it
    /// is whole already.
    fn widen(offset: u64, len: u64) -> Option<(u64, u64)> {
        let start = offset / SECTOR_SIZE * SECTOR_SIZE;
        let end = (offset + len).next_multiple_of(SECTOR_SIZE);
        (start != offset || end != offset + len).then_some((start, end))
    }
}

impl Image for FileMirrored {
    fn virtual_size(&self) -> u64 {
        self.primary.virtual_size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        match self.state.phase() {
            Phase::Standby => self.primary.read_at(buf, offset),
            Phase::Mirroring => match self.primary.vhd() {
                Some(leaf) => read_own_then(leaf, buf, offset, &mut |piece, off| {
                    self.secondary_over(piece, off, &mut |p, o| self.parents(p, o))?;
                    if let Some(fill) = &self.state.fill {
                        // Under the gate: never into a leaf being retired.
                        let _shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
                        if self.state.phase() == Phase::Mirroring {
                            fill.fill(leaf, piece, off);
                        }
                    }
                    Ok(())
                }),
                // A raw leaf holds every sector itself.
                None => self.primary.read_at(buf, offset),
            },
            Phase::Retired => self.secondary_over(buf, offset, &mut |p, o| self.parents(p, o)),
            Phase::FailedOver => {
                self.secondary_over(buf, offset, &mut |p, o| self.primary.read_at(p, o))
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.virtual_size())
        {
            return Err(ImageError::OutOfRange {
                offset,
                len,
                size: self.virtual_size(),
            });
        }
        let Some((start, end)) = Self::widen(offset, len) else {
            return self.write_with(offset, len, &|img| img.write_at(buf, offset));
        };
        let _g = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_at(&mut whole, start)?;
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write_with(start, end - start, &|img| img.write_at(&whole, start))
    }

    fn flush(&self) -> Result<(), ImageError> {
        match self.state.phase() {
            Phase::Standby => self.primary.flush(),
            // Every write the leaf acknowledged is in the secondary too.
            Phase::Retired => self.secondary.flush(),
            Phase::Mirroring | Phase::FailedOver => {
                self.primary.flush()?;
                self.secondary.flush()
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        // The leaf (differencing) and a lone secondary would expose what
        // lies below them: a discard reads back as zeroes, written.
        self.write_zeroes(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), ImageError> {
        let size = self.virtual_size();
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or(ImageError::OutOfRange { offset, len, size })?;
        let mut off = offset;
        while off < end {
            let n = (end - off).min(super::ZEROES.len() as u64) as usize;
            self.write_at(&super::ZEROES[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        if self.state.phase() == Phase::Standby {
            return self.primary.block_status(offset, len);
        }
        // The secondary's sectors are not in the leaf's map: say data
        // (never a hole that is not one).
        Ok(Extent {
            len: len.min(self.virtual_size().saturating_sub(offset)).max(1),
            allocated: true,
            zero: false,
        })
    }

    fn stats(&self) -> Vec<LayerStats> {
        let mut out = self.primary.stats();
        let sec = self.secondary.stats();
        match self.state.phase() {
            Phase::Standby => {}
            Phase::Mirroring => {
                let at = 1.min(out.len());
                out.splice(at..at, sec);
            }
            Phase::Retired => {
                out.splice(..1.min(out.len()), sec);
            }
            Phase::FailedOver => {
                out.splice(..0, sec);
            }
        }
        out
    }
}
