//! One VHD file, opened: maps virtual offsets to file offsets and writes
//! its own blocks. It knows nothing of parents; [`super::image`] walks the
//! chain.
//!
//! Concurrency: every method takes `&self`. The BAT is behind an `RwLock`
//! (readers and writers of allocated blocks only take it briefly for
//! reading); allocation and deallocation are serialized by one mutex; sector
//! bitmaps are cached in sharded mutexes that also serialize the
//! read-modify-write of one block's bitmap. Blocks known to be fully
//! written ("full", the in-memory batmap) skip their bitmap entirely.
//!
//! Crash safety of allocation (new block): bitmap and data are written at
//! the old end of the file, then the BAT entry, then the footer at the new
//! end, with a data sync between steps when `sync_metadata` is on (off,
//! the BAT entry waits for the flush: `deferred_bat`). For an allocated
//! block, data is written and synced before its bitmap bits are set.

use super::bat::UNUSED;
use super::batmap::{self, BatmapHeader};
use super::bitmap;
use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::header::Header;
use super::locator;
use crate::stats::LayerCounters;
use crate::{Backing, ImageError, LayerStats, ParentLocator};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

mod budget;
mod deferred_bat;
mod direct;
mod empty;
mod open;
pub mod raw;
mod write;

const BITMAP_SHARDS: usize = 16;
/// Partial-block bitmaps cached per shard (full blocks need none), at
/// most; fewer when the memory budget is short (see [`memory_need`]).
const BITMAPS_PER_SHARD: usize = 256;

/// How a layer is opened.
#[derive(Debug, Clone, Copy)]
pub struct VhdOptions {
    /// Sync data between the steps of a block allocation, so that a crash
    /// leaves either the old or the new contents. Offline bulk writers
    /// (convert, coalesce) turn it off and sync once: new BAT entries then
    /// wait in memory for the next flush, which writes them after a data
    /// sync ([`deferred_bat`]), so a crash still never leaves an entry
    /// pointing at unwritten space. A bitmap update of an allocated block
    /// is preceded by a data sync either way.
    pub sync_metadata: bool,
}

impl Default for VhdOptions {
    fn default() -> Self {
        VhdOptions {
            sync_metadata: true,
        }
    }
}

/// The on-disk batmap we keep up to date (when the image had a valid one).
#[derive(Debug)]
struct BatmapDisk {
    header_offset: u64,
    header: Mutex<BatmapHeader>,
    sum_len: u64,
}

#[derive(Debug)]
struct AllocState {
    /// Where the next block goes.
    data_end: u64,
    /// Known length of the file.
    file_len: u64,
}

#[derive(Debug)]
struct Sparse {
    header: Header,
    block_size: u64,
    block_shift: u32,
    bitmap_bytes: u64,
    sectors_per_block: usize,
    differencing: bool,
    bat: RwLock<Vec<u32>>,
    /// One bit per block: fully written (every sector bit set).
    full: Vec<AtomicU64>,
    /// One bit per block whose `full` bit comes from the on-disk batmap
    /// and has not been checked against the block's sector bitmap yet.
    /// The batmap is a hint: the first use of such a block reads the
    /// bitmap, and one bit that disagrees invalidates every unchecked one.
    hinted: Vec<AtomicU64>,
    /// Blocks below this index may be recorded in the on-disk batmap.
    batmap_bits: u64,
    batmap: Option<BatmapDisk>,
    batmap_dirty: AtomicBool,
    /// Blocks allocated with `sync_metadata` off whose BAT entry is only
    /// in memory yet (see [`deferred_bat`]).
    pending_bat: Mutex<Vec<u32>>,
    bitmaps: Vec<Mutex<HashMap<u32, Arc<[u8]>>>>,
    /// Entries each bitmap shard may hold (the budget's grant).
    cache_per_shard: usize,
    /// This layer's share of the worker's locked memory.
    _memory: crate::memory::Reservation,
    alloc: Mutex<AllocState>,
}

/// One opened VHD file.
#[derive(Debug)]
pub struct VhdLayer {
    file: Box<dyn Backing>,
    name: String,
    footer: Footer,
    footer_bytes: [u8; FOOTER_SIZE],
    virtual_size: u64,
    read_only: bool,
    /// blktap's keyhash is set: opened read-only only without a key.
    encrypted: bool,
    /// The data cipher of an encrypted layer opened with its key.
    cipher: Option<super::crypt::SectorCipher>,
    options: VhdOptions,
    sparse: Option<Sparse>,
    /// A raw file serving as the parent of a differencing image (see
    /// [`raw`]): its footer is made up, its bytes are all disk.
    raw: bool,
    pub(crate) counters: LayerCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the protected
    // state half-updated in a way later users could not cope with (they
    // re-read from disk), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Alignment of a block's data area in the file, as libvhd and tapdisk
/// place new blocks (`getpagesize()`): direct I/O on 4K-native disks and
/// the direct io_uring path then get aligned requests.
pub const DATA_ALIGN: u64 = 4096;

/// Where a new block goes when the data ends at `data_end`: the first
/// sector from there on at which its data, after the `bitmap_bytes` of
/// sector bitmap, starts on a [`DATA_ALIGN`] boundary (libvhd's `gap`).
/// Blocks already in the file stay where they are, aligned or not.
pub fn aligned_block_start(data_end: u64, bitmap_bytes: u64) -> Option<u64> {
    let data = data_end.checked_add(bitmap_bytes)?;
    Some(data.checked_next_multiple_of(DATA_ALIGN)? - bitmap_bytes)
}

/// The refusal to write into an image blktap encrypts (see
/// [`super::batmap::BatmapHeader::keyhash_set`]).
pub(crate) fn encrypted_error(name: &str) -> ImageError {
    ImageError::Unsupported(format!(
        "{name} is encrypted (its batmap header carries blktap's keyhash) and no key was \
         given: tapjail will not write plaintext into it or into a child of it; serve it with \
         `tap-ctl open -E` and the key on stdin"
    ))
}

impl VhdLayer {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whether blktap's keyhash says tapdisk encrypts this image.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }
    /// The data cipher, when this layer is encrypted and was opened keyed.
    pub fn cipher(&self) -> Option<&super::crypt::SectorCipher> {
        self.cipher.as_ref()
    }
    pub fn uuid(&self) -> [u8; 16] {
        self.footer.uuid()
    }
    pub fn header(&self) -> Option<&Header> {
        self.sparse.as_ref().map(|s| &s.header)
    }
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }
    pub fn file(&self) -> &dyn Backing {
        self.file.as_ref()
    }

    /// Number of allocated blocks (for fixed images: 0).
    pub fn allocated_blocks(&self) -> u64 {
        self.sparse.as_ref().map_or(0, |s| {
            s.bat
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|&&e| e != UNUSED)
                .count() as u64
        })
    }

    pub fn stats(&self) -> LayerStats {
        let driver = if self.raw { "aio" } else { "vhd" };
        self.counters.snapshot(&self.name, driver)
    }

    /// The parent's UUID (differencing images only).
    pub fn parent_uuid(&self) -> Option<[u8; 16]> {
        match &self.sparse {
            Some(s) if s.differencing => Some(s.header.parent_uuid()),
            _ => None,
        }
    }

    /// Decoded parent locators in header order, then the parent's unicode
    /// name. Locators that cannot be decoded are skipped (check reports
    /// them).
    pub fn parent_locators(&self) -> Vec<ParentLocator> {
        let Some(s) = self.sparse.as_ref().filter(|s| s.differencing) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for loc in s.header.locators.iter().filter(|l| l.code.is_readable()) {
            let mut buf = vec![0u8; loc.data_len as usize]; // bounded by MAX_LOCATOR_LEN at open
            if self.file.read_exact_at(&mut buf, loc.data_offset).is_err() {
                continue;
            }
            if let Ok(l) = locator::decode(loc.code, &buf) {
                if !out.contains(&l) {
                    out.push(l);
                }
            }
        }
        if let Some(name) = s.header.parent_name() {
            if !name.is_empty() && !name.contains('\0') {
                out.push(ParentLocator {
                    code: "name".into(),
                    relative: !name.starts_with('/'),
                    path: name,
                });
            }
        }
        out
    }

    /// Check `block`'s batmap bit against its sector bitmap if nobody has
    /// yet (see [`Sparse::hinted`]). With `load` false nothing is read:
    /// `false` then means the bit is still unchecked.
    fn verify_hint(
        &self,
        s: &Sparse,
        block: usize,
        entry: u32,
        load: bool,
    ) -> Result<bool, ImageError> {
        let bit = 1u64 << (block % 64);
        if s.hinted[block / 64].load(Ordering::Acquire) & bit == 0 {
            return Ok(true);
        }
        if !load {
            return Ok(false);
        }
        let shard = lock(&s.bitmaps[block % BITMAP_SHARDS]);
        if s.hinted[block / 64].load(Ordering::Acquire) & bit == 0 {
            return Ok(true);
        }
        let off = u64::from(entry) * 512;
        let mut buf = vec![0u8; s.bitmap_bytes as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(ImageError::io("read bitmap", off))?;
        drop(shard);
        if bitmap::is_full(&buf, s.sectors_per_block) {
            s.hinted[block / 64].fetch_and(!bit, Ordering::AcqRel);
            return Ok(true);
        }
        // The batmap lied about this block, so it may about any: drop
        // every unchecked bit (their bitmaps are read on use) and have the
        // batmap rewritten from what is known.
        for (h, f) in s.hinted.iter().zip(&s.full) {
            let unchecked = h.swap(0, Ordering::AcqRel);
            f.fetch_and(!unchecked, Ordering::AcqRel);
        }
        if s.batmap.is_some() && !self.read_only {
            s.batmap_dirty.store(true, Ordering::Release);
        }
        Ok(true)
    }

    fn is_full(s: &Sparse, block: usize) -> bool {
        s.full[block / 64].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    fn set_full(&self, s: &Sparse, block: usize, full: bool) {
        let bit = 1u64 << (block % 64);
        let old = if full {
            s.full[block / 64].fetch_or(bit, Ordering::AcqRel)
        } else {
            s.full[block / 64].fetch_and(!bit, Ordering::AcqRel)
        };
        if (old & bit != 0) != full && (block as u64) < s.batmap_bits && !self.read_only {
            s.batmap_dirty.store(true, Ordering::Release);
        }
    }

    /// Where the bytes at `offset` live in this layer: the length of the
    /// run from `offset` (at most `max`, at least 1 byte) that shares one
    /// status, and its file offset if this layer holds it.
    /// `offset` must be below the virtual size.
    pub fn map(&self, offset: u64, max: u64) -> Result<(u64, Option<u64>), ImageError> {
        self.map_with(offset, max, true)?.ok_or_else(|| {
            ImageError::InvalidArgument("block bitmap not loaded".into()) // not reached: loading was allowed
        })
    }

    /// [`Self::map`] without reading from the file: `None` when the answer
    /// needs a sector bitmap that is not cached (fully written blocks and
    /// holes never do).
    pub fn map_cached(&self, offset: u64, max: u64) -> Option<(u64, Option<u64>)> {
        self.map_with(offset, max, false).ok().flatten()
    }

    fn map_with(
        &self,
        offset: u64,
        max: u64,
        load: bool,
    ) -> Result<Option<(u64, Option<u64>)>, ImageError> {
        let Some(s) = &self.sparse else {
            return Ok(Some((max, Some(offset))));
        };
        let block = (offset >> s.block_shift) as usize;
        let in_block = offset & (s.block_size - 1);
        let to_block_end = s.block_size - in_block;
        let entry = {
            let bat = s.bat.read().unwrap_or_else(|p| p.into_inner());
            let entry = bat[block];
            if entry == UNUSED {
                let mut len = to_block_end;
                let mut b = block + 1;
                while len < max && b < bat.len() && bat[b] == UNUSED {
                    len += s.block_size;
                    b += 1;
                }
                return Ok(Some((len.min(max), None)));
            }
            entry
        };
        let data = u64::from(entry) * 512 + s.bitmap_bytes;
        if !self.verify_hint(s, block, entry, load)? {
            return Ok(None);
        }
        if Self::is_full(s, block) {
            return Ok(Some((to_block_end.min(max), Some(data + in_block))));
        }
        let map = if load {
            self.bitmap(s, block, entry)?
        } else {
            match lock(&s.bitmaps[block % BITMAP_SHARDS]).get(&(block as u32)) {
                Some(m) => m.clone(),
                None => return Ok(None),
            }
        };
        if Self::is_full(s, block) {
            return Ok(Some((to_block_end.min(max), Some(data + in_block))));
        }
        let sector = (in_block / 512) as usize;
        let (present, n) = bitmap::run(&map, sector, s.sectors_per_block);
        let run = (sector + n) as u64 * 512 - in_block;
        Ok(Some((run.min(max), present.then_some(data + in_block))))
    }

    /// The sector bitmap of an allocated block, from the cache or the file.
    /// A full bitmap marks the block full instead of being cached.
    fn bitmap(&self, s: &Sparse, block: usize, entry: u32) -> Result<Arc<[u8]>, ImageError> {
        let mut shard = lock(&s.bitmaps[block % BITMAP_SHARDS]);
        self.bitmap_locked(s, &mut shard, block, entry)
    }

    fn bitmap_locked(
        &self,
        s: &Sparse,
        shard: &mut HashMap<u32, Arc<[u8]>>,
        block: usize,
        entry: u32,
    ) -> Result<Arc<[u8]>, ImageError> {
        if let Some(m) = shard.get(&(block as u32)) {
            return Ok(m.clone());
        }
        let off = u64::from(entry) * 512;
        let mut buf = vec![0u8; s.bitmap_bytes as usize];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(ImageError::io("read bitmap", off))?;
        let map: Arc<[u8]> = buf.into();
        if bitmap::is_full(&map, s.sectors_per_block) {
            self.set_full(s, block, true);
        } else {
            budget::cache_insert(s, shard, block, map.clone());
        }
        Ok(map)
    }

    /// Read file bytes this layer holds (as returned by [`Self::map`]).
    pub fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<(), ImageError> {
        let r = self
            .file
            .read_exact_at(buf, file_offset)
            .map_err(ImageError::io("read", file_offset));
        self.counters.on_read(buf.len() as u64, r)
    }

    /// [`Self::read_data`] only from the page cache (see
    /// [`Backing::read_exact_at_nowait`]). Not counted in the stats: the
    /// caller counts once the whole request succeeded.
    pub fn read_data_nowait(&self, buf: &mut [u8], file_offset: u64) -> bool {
        self.file.read_exact_at_nowait(buf, file_offset)
    }

    fn sync(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(ImageError::io("fsync", 0))
    }

    /// Whether `block` is allocated (sparse images only).
    pub fn block_allocated(&self, block: usize) -> bool {
        self.sparse
            .as_ref()
            .is_some_and(|s| s.bat.read().unwrap_or_else(|p| p.into_inner())[block] != UNUSED)
    }

    /// Deallocate a whole block of a dynamic image: the BAT entry first,
    /// then its space is given back. Never used on differencing images,
    /// where it would expose the parent's data. Ignores direct mappings:
    /// the served image uses [`VhdLayer::deallocate_unless`].
    pub fn deallocate(&self, block: usize) -> Result<(), ImageError> {
        self.deallocate_unless(block, || false).map(drop)
    }

    /// Zero a byte range of a fixed image by punching a hole (false if the
    /// filesystem cannot).
    pub fn punch_fixed(&self, offset: u64, len: u64) -> Result<bool, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        match self.file.punch_hole(offset, len) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(false),
            Err(e) => Err(ImageError::io("punch hole", offset)(e)),
        }
    }

    /// Write the batmap if it changed, then make everything durable.
    pub fn flush(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.write_pending_bat(true)?;
        self.write_batmap()?;
        self.sync()
    }

    /// Write the batmap if it changed, without syncing (offline bulk
    /// writers that do not need durability).
    pub fn write_back(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.write_pending_bat(false)?;
        self.write_batmap()
    }

    fn write_batmap(&self) -> Result<(), ImageError> {
        let Some(s) = &self.sparse else { return Ok(()) };
        let Some(bm) = &s.batmap else { return Ok(()) };
        if !s.batmap_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut header = lock(&bm.header);
        let mut map = vec![0u8; header.map_bytes() as usize];
        for b in 0..s.batmap_bits as usize {
            if Self::is_full(s, b) {
                bitmap::set_range(&mut map, b, 1);
            }
        }
        header.version = batmap::CURRENT_VERSION;
        header.checksum = batmap::checksum(&map[..bm.sum_len as usize], header.version);
        let r = self
            .file
            .write_all_at(&map, header.offset)
            .and_then(|()| self.file.write_all_at(&header.to_bytes(), bm.header_offset))
            .map_err(ImageError::io("write batmap", header.offset));
        if r.is_err() {
            s.batmap_dirty.store(true, Ordering::Release);
        }
        r
    }
}

impl Drop for VhdLayer {
    fn drop(&mut self) {
        // Best effort, like tapdisk's close: the batmap is an optimisation
        // and a stale one is safe (it only ever lacks bits).
        if !self.read_only {
            let _ = self.write_pending_bat(true);
            let _ = self.write_batmap();
        }
    }
}
