//! Direct mappings of a VHD chain (see [`crate::direct`]).
//!
//! What maps, decided from metadata in memory only:
//! - reads, sector run by sector run, through the chain as
//!   [`VhdImage::read_at`](crate::Image::read_at) walks it: sectors
//!   present in a layer map to that layer's file, ranges unallocated at the
//!   root (or beyond a smaller parent) map to zeroes. Parents are read-only
//!   for the whole life of the chain, so a mapping into one can never go
//!   stale; data in a parent therefore maps too, instead of falling back;
//! - writes, to the leaf only, where every touched sector is already
//!   present in an allocated block (a dynamic image's blocks are full from
//!   their allocation on; a differencing leaf's sectors once written): the
//!   data goes in place and no bitmap, BAT or footer changes, which is
//!   exactly the case the synchronous engine also handles with one write.
//!
//! What does not: anything allocating, a bitmap not in the cache (the
//! synchronous path loads it), partial sectors, read-only leaves for
//! writes, more than [`MAX_SEGMENTS`] pieces, chains with a layer whose file
//! has no fd of its own.
//!
//! Blocks of a dynamic leaf are pinned by the mapping (both reads and
//! writes: a read must not see another block's data either if freed space
//! were ever handed out again) and
//! [`VhdLayer::deallocate_unless`](super::VhdLayer::deallocate_unless)
//! leaves pinned blocks allocated. Fixed leaves never deallocate (a discard
//! punches the file, which a concurrent write simply refills) and
//! differencing leaves never do either.

use super::footer::DiskType;
use super::VhdImage;
use crate::direct::{Pins, MAX_DIRECT_FILES, MAX_SEGMENTS};
use crate::{DirectFile, Image, Mapping, SyncFiles, Target, SECTOR_SIZE};
use std::sync::Arc;

/// What a chain needs for direct mappings, fixed when it is opened.
#[derive(Debug, Default)]
pub struct DirectState {
    pins: Arc<Pins>,
    /// One per layer, leaf first; empty if some layer has no fd.
    files: Vec<DirectFile>,
}

impl DirectState {
    pub fn new(layers: &[super::VhdLayer]) -> DirectState {
        // An encrypted layer's file bytes are ciphertext: no direct path.
        let files: Option<Vec<DirectFile>> = layers
            .iter()
            .map(|l| l.cipher().is_none().then(|| l.file().direct_fd()).flatten())
            .collect();
        DirectState {
            pins: Arc::default(),
            files: files
                .filter(|f| f.len() <= MAX_DIRECT_FILES)
                .unwrap_or_default(),
        }
    }

    /// Whether a direct mapping may currently point into `block` of the leaf.
    pub fn busy(&self, block: u64) -> bool {
        self.pins.busy(block)
    }
}

impl VhdImage {
    pub(super) fn direct_files_impl(&self) -> Vec<DirectFile> {
        self.direct.files.clone()
    }

    pub(super) fn map_direct_impl(&self, offset: u64, len: u64, write: bool) -> Option<Mapping> {
        let end = offset.checked_add(len)?;
        if self.direct.files.is_empty()
            || len == 0
            || end > self.virtual_size()
            || !offset.is_multiple_of(SECTOR_SIZE)
            || !len.is_multiple_of(SECTOR_SIZE)
        {
            return None;
        }
        let leaf = self.leaf();
        if write && leaf.read_only() {
            return None;
        }
        let mut m = Mapping::new(write);
        if leaf.disk_type() == DiskType::Dynamic {
            // Pin before looking at the BAT (see Pins::busy).
            let bs = leaf.block_size()?;
            let first = offset / bs;
            m.pin(&self.direct.pins, first, (end - 1) / bs - first + 1);
        }
        let mut pos = offset;
        while pos < end {
            let (n, target) = if write {
                let (n, at) = leaf.map_cached(pos, end - pos)?;
                (
                    n,
                    Target::File {
                        file: 0,
                        offset: at?,
                    },
                )
            } else {
                self.map_read_piece(pos, end - pos)?
            };
            let n = n.clamp(1, end - pos);
            if !m.push(n, target) {
                return None;
            }
            pos += n;
        }
        debug_assert!(m.segments().len() <= MAX_SEGMENTS);
        Some(m)
    }

    /// Where the first bytes of `[pos, pos + max)` are read from, and how
    /// many share that place.
    fn map_read_piece(&self, pos: u64, mut max: u64) -> Option<(u64, Target)> {
        for (level, layer) in self.layers().iter().enumerate() {
            let size = layer.virtual_size();
            if pos >= size {
                // Beyond a (smaller) parent: zeroes, as read_at gives.
                return Some((max, Target::Zero));
            }
            let limit = max.min(size - pos);
            let (n, at) = layer.map_cached(pos, limit)?;
            let n = n.clamp(1, limit);
            match at {
                Some(offset) => {
                    return Some((
                        n,
                        Target::File {
                            file: level,
                            offset,
                        },
                    ))
                }
                None if layer.disk_type() == DiskType::Differencing => max = n,
                None => return Some((n, Target::Zero)),
            }
        }
        Some((max, Target::Zero))
    }

    pub(super) fn direct_done_impl(&self, m: &Mapping, ok: bool) {
        let layers = self.layers();
        let mut files = m.segments().iter().filter_map(|s| match s.target {
            Target::File { file, .. } => layers.get(file).map(|l| (l, s.len)),
            Target::Zero => None,
        });
        if !ok {
            // As the synchronous path: one failure, on the layer it hit
            // (here: the first one the request touched).
            if let Some((l, _)) = files.next() {
                if m.is_write() {
                    l.counters.write_failed();
                } else {
                    l.counters.read_failed();
                }
            }
            return;
        }
        for (l, len) in files {
            if m.is_write() {
                l.counters.write(len);
            } else {
                l.counters.read(len);
            }
        }
    }

    pub(super) fn direct_sync_impl(&self) -> Option<SyncFiles> {
        let leaf = self.leaf();
        if leaf.read_only() {
            return Some(SyncFiles(0));
        }
        if self.direct.files.is_empty() || leaf.batmap_dirty() || leaf.bat_pending() {
            return None;
        }
        Some(SyncFiles(1))
    }
}
