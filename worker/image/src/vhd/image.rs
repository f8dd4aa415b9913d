//! A VHD chain (leaf first) served as one virtual disk: the [`Image`]
//! implementation. Reads walk the chain sector run by sector run; writes
//! go to the leaf; partial sectors are read-modify-written.

use super::footer::DiskType;
use super::layer::VhdLayer;
use super::MAX_CHAIN_DEPTH;
use crate::zeroes::{ZEROES, ZERO_CHUNK};
use crate::{Extent, Image, ImageError, LayerStats, SECTOR_SIZE};
use std::sync::{Mutex, MutexGuard};

/// Stripes serializing read-modify-write of partial sectors.
const RMW_STRIPES: usize = 64;
/// Largest zero buffer used by write_zeroes.
/// block_status merges at most this many runs into one extent.
const MAX_STATUS_RUNS: usize = 4096;

/// An open VHD chain.
#[derive(Debug)]
pub struct VhdImage {
    layers: Vec<VhdLayer>,
    rmw: Vec<Mutex<()>>,
    /// Some layer is encrypted ([`super::crypt`]): reads go by whole
    /// sectors and there is no nowait or direct path (the bytes on disk
    /// are not the disk's).
    keyed: bool,
    pub(super) direct: super::direct::DirectState,
}

impl VhdImage {
    /// Build from layers, leaf first. Every layer but the leaf is a parent
    /// and must be read-only; the caller has checked UUIDs.
    pub fn from_layers(layers: Vec<VhdLayer>) -> Result<VhdImage, ImageError> {
        if layers.is_empty() {
            return Err(ImageError::InvalidArgument("empty chain".into()));
        }
        if layers[1..].iter().any(|l| !l.read_only()) {
            return Err(ImageError::InvalidArgument(
                "parents must be opened read-only".into(),
            ));
        }
        Ok(VhdImage {
            keyed: layers.iter().any(|l| l.cipher().is_some()),
            direct: super::direct::DirectState::new(&layers),
            layers,
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The layers, leaf first.
    pub fn layers(&self) -> &[VhdLayer] {
        &self.layers
    }

    pub fn leaf(&self) -> &VhdLayer {
        &self.layers[0]
    }

    /// Take the layers back (leaf first), e.g. to reopen the parent writable.
    pub fn into_layers(self) -> Vec<VhdLayer> {
        self.layers
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ImageError::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.leaf().read_only() {
            Err(ImageError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Read through layers `level..`.
    fn read_from(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let Some(layer) = self.layers.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        let size = layer.virtual_size();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            if off >= size {
                // Beyond a (smaller) parent: zeroes, not the grandparent's data.
                buf[done..].fill(0);
                break;
            }
            let max = ((buf.len() - done) as u64).min(size - off);
            let (n, loc) = layer.map(off, max).inspect_err(|_| {
                layer.counters.read_failed();
            })?;
            let n = n.clamp(1, max) as usize;
            let piece = &mut buf[done..done + n];
            match loc {
                Some(file_off) => {
                    layer.read_data(piece, file_off)?;
                    if let Some(c) = layer.cipher() {
                        if !off.is_multiple_of(SECTOR_SIZE)
                            || !n.is_multiple_of(SECTOR_SIZE as usize)
                        {
                            return Err(ImageError::InvalidArgument(format!(
                                "{}: an encrypted read of part of a sector ({n} bytes at {off})",
                                layer.name()
                            )));
                        }
                        c.decrypt(piece, off / SECTOR_SIZE);
                    }
                }
                None if layer.disk_type() == DiskType::Differencing => {
                    self.read_from(level + 1, piece, off)?
                }
                None => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Read through the parents only (every layer below the leaf): what a
    /// read cache ([`super::read_cache`]) fetches on a miss, and what lies
    /// below a file secondary ([`super::stack`]).
    pub fn read_parents(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_from(1, buf, offset)
    }

    /// [`Self::read_from`] without waiting for a device (see
    /// [`Image::read_at_nowait`]); false as soon as a piece would. Bytes
    /// read per layer are added to `hits` (counted only if the whole read
    /// succeeds, since a failed attempt is repeated by `read_at`).
    fn read_from_nowait(
        &self,
        level: usize,
        buf: &mut [u8],
        offset: u64,
        hits: &mut [u64; MAX_CHAIN_DEPTH],
    ) -> bool {
        let Some(layer) = self.layers.get(level) else {
            buf.fill(0);
            return true;
        };
        if level >= hits.len() {
            return false; // deeper than any chain we open
        }
        let size = layer.virtual_size();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            if off >= size {
                buf[done..].fill(0);
                break;
            }
            let max = ((buf.len() - done) as u64).min(size - off);
            let Some((n, loc)) = layer.map_cached(off, max) else {
                return false;
            };
            let n = n.clamp(1, max) as usize;
            let piece = &mut buf[done..done + n];
            let ok = match loc {
                Some(file_off) => {
                    hits[level] += n as u64;
                    layer.read_data_nowait(piece, file_off)
                }
                None if layer.disk_type() == DiskType::Differencing => {
                    self.read_from_nowait(level + 1, piece, off, hits)
                }
                None => {
                    piece.fill(0);
                    true
                }
            };
            if !ok {
                return false;
            }
            done += n;
        }
        true
    }

    /// Status of the run at `offset` through layers `level..`.
    fn status_from(&self, level: usize, offset: u64, len: u64) -> Result<Extent, ImageError> {
        let hole = |len| Extent {
            len,
            allocated: false,
            zero: true,
        };
        let Some(layer) = self.layers.get(level) else {
            return Ok(hole(len));
        };
        let size = layer.virtual_size();
        if offset >= size {
            return Ok(hole(len));
        }
        let max = len.min(size - offset);
        let (n, loc) = layer.map(offset, max)?;
        let n = n.clamp(1, max);
        match loc {
            Some(_) => Ok(Extent {
                len: n,
                allocated: true,
                zero: false,
            }),
            None if layer.disk_type() == DiskType::Differencing => {
                self.status_from(level + 1, offset, n)
            }
            None => Ok(hole(n)),
        }
    }

    fn rmw_lock(&self, sector: u64) -> MutexGuard<'_, ()> {
        self.rmw[(sector % RMW_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Write bytes within one sector by read-modify-write.
    fn write_partial_sector(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
        let sector = offset / SECTOR_SIZE;
        let start = sector * SECTOR_SIZE;
        let _g = self.rmw_lock(sector);
        let mut buf = [0u8; SECTOR_SIZE as usize];
        // The disk may end inside... it cannot: virtual sizes are whole sectors.
        self.read_from(0, &mut buf, start)?;
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.leaf().write_sectors(&buf, start)
    }

    fn zero_by_writing(&self, mut offset: u64, len: u64) -> Result<(), ImageError> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.write_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl Image for VhdImage {
    fn virtual_size(&self) -> u64 {
        self.leaf().virtual_size()
    }

    fn read_only(&self) -> bool {
        self.leaf().read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        if self.keyed && !(offset.is_multiple_of(SECTOR_SIZE) && end.is_multiple_of(SECTOR_SIZE)) {
            // Decryption is per whole sector: read the covering sectors.
            let start = offset / SECTOR_SIZE * SECTOR_SIZE;
            let mut whole = vec![0u8; (end.next_multiple_of(SECTOR_SIZE) - start) as usize];
            self.read_from(0, &mut whole, start)?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            return Ok(());
        }
        self.read_from(0, buf, offset)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.keyed {
            return false;
        }
        let mut hits = [0u64; MAX_CHAIN_DEPTH];
        let done = self.check_range(offset, buf.len() as u64).is_ok()
            && self.read_from_nowait(0, buf, offset, &mut hits);
        if done {
            for (layer, &bytes) in self.layers.iter().zip(&hits) {
                if bytes > 0 {
                    layer.counters.read(bytes);
                }
            }
        }
        done
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let head_end = offset.next_multiple_of(SECTOR_SIZE).min(end);
        let mut pos = offset;
        if !offset.is_multiple_of(SECTOR_SIZE) {
            self.write_partial_sector(&buf[..(head_end - offset) as usize], offset)?;
            pos = head_end;
        }
        let tail_start = (end / SECTOR_SIZE * SECTOR_SIZE).max(pos);
        if tail_start > pos {
            let a = (pos - offset) as usize;
            let b = (tail_start - offset) as usize;
            self.leaf().write_sectors(&buf[a..b], pos)?;
        }
        if end > tail_start {
            self.write_partial_sector(&buf[(tail_start - offset) as usize..], tail_start)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.leaf().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let leaf = self.leaf();
        match leaf.disk_type() {
            DiskType::Fixed => {
                if may_unmap && leaf.punch_fixed(offset, len)? {
                    return Ok(());
                }
                self.zero_by_writing(offset, len)
            }
            // Deallocating would expose the parent's data: write zeroes.
            DiskType::Differencing => self.zero_by_writing(offset, len),
            DiskType::Dynamic => {
                let bs = leaf.block_size().unwrap_or(SECTOR_SIZE);
                let end = offset + len;
                let mut pos = offset;
                while pos < end {
                    let block = pos / bs;
                    let block_start = block * bs;
                    let piece_end = (block_start + bs).min(end);
                    let whole = pos == block_start && piece_end == block_start + bs;
                    if !leaf.block_allocated(block as usize) {
                        // Reads as zero already.
                    } else if whole && may_unmap {
                        // A block with direct I/O in flight keeps its
                        // place; it is zeroed in place instead.
                        if !leaf.deallocate_unless(block as usize, || self.direct.busy(block))? {
                            self.zero_by_writing(pos, piece_end - pos)?;
                        }
                    } else {
                        self.zero_by_writing(pos, piece_end - pos)?;
                    }
                    pos = piece_end;
                }
                Ok(())
            }
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(ImageError::InvalidArgument(
                "zero-length block status".into(),
            ));
        }
        let mut ext = self.status_from(0, offset, len)?;
        let mut runs = 1;
        while ext.len < len && runs < MAX_STATUS_RUNS {
            let next = self.status_from(0, offset + ext.len, len - ext.len)?;
            if next.allocated != ext.allocated || next.zero != ext.zero {
                break;
            }
            ext.len += next.len;
            runs += 1;
        }
        Ok(ext)
    }

    fn stats(&self) -> Vec<LayerStats> {
        self.layers.iter().map(|l| l.stats()).collect()
    }

    fn direct_files(&self) -> Vec<crate::DirectFile> {
        self.direct_files_impl()
    }

    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<crate::Mapping> {
        self.map_direct_impl(offset, len, write)
    }

    fn direct_done(&self, mapping: &crate::Mapping, ok: bool) {
        self.direct_done_impl(mapping, ok)
    }

    fn direct_sync(&self) -> Option<crate::SyncFiles> {
        self.direct_sync_impl()
    }

    fn vhd(&self) -> Option<&VhdImage> {
        Some(self)
    }
}
