//! One tracked bitmap: 64 KiB blocks written since its last checkpoint,
//! kept in memory and in a log file ([`super::log`]'s format) written
//! ahead of the data.
//!
//! Write-ahead: [`Bitmap::mark`] returns only once every bit of the range
//! is on disk (the store is opened `O_DSYNC`), and the caller writes the
//! data only after that, so after a crash the file holds every block an
//! acknowledged write touched (and perhaps some that were never written:
//! a superset). Concurrent writers share one file write (group commit):
//! bits set in memory raise `dirty`, a file write covering everything up
//! to some `dirty` value raises `durable` to it, and a writer waits only
//! until `durable` reaches the `dirty` its own bits made. A block marked
//! once costs nothing more until the next checkpoint.

use super::log::{self, Header, LogError, BLOCK_SIZE, HEADER_LEN};
use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// Bitmap bytes per file write: one 4 KiB page covers 2 GiB of disk.
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// Where a bitmap's bytes go. Writes must be durable when they return
/// (the worker's store is a file the broker opened `O_DSYNC`).
pub trait LogStore: Send + Sync + std::fmt::Debug {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl LogStore for std::fs::File {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
}

/// Whether the bitmap is one of ours (`tap-ctl cbt`) or XAPI's log
/// (`open -C`), whose consistent flag belongs to SM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Named,
    XapiLog,
}

#[derive(Debug)]
pub struct Bitmap {
    /// Unique in this process: what an NBD session that selected the
    /// bitmap holds (a bitmap stopped and started again is another one).
    id: u64,
    name: String,
    origin: Origin,
    disk_size: u64,
    blocks: u64,
    /// Bit `n` is bit `n % 64` of word `n / 64`; a word's little-endian
    /// bytes are the file's bytes.
    words: Vec<AtomicU64>,
    /// Bitmap pages with bits set in memory but not yet written.
    pending: Mutex<BTreeSet<usize>>,
    dirty: AtomicU64,
    durable: AtomicU64,
    /// Held while writing to the store: one writer at a time.
    sync: Mutex<()>,
    store: Box<dyn LogStore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a set of page numbers or nothing; a panic
    // elsewhere leaves it usable (at worst a page is written again).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bitmap {
    /// Start a new, clean bitmap for a `disk_size`-byte disk: the whole
    /// file is written (header with `consistent` set, all bits clear).
    pub fn create(
        name: &str,
        disk_size: u64,
        store: Box<dyn LogStore>,
    ) -> Result<Bitmap, BitmapError> {
        if disk_size > log::MAX_DISK_SIZE {
            return Err(BitmapError::Log(LogError::TooBig(disk_size)));
        }
        store
            .write_at(&log::fresh(disk_size), 0)
            .map_err(BitmapError::Write)?;
        Ok(Bitmap::from_bytes(
            name,
            Origin::Named,
            disk_size,
            &[],
            store,
        ))
    }

    /// Take over an existing log file whose bytes are `file`.
    pub fn load(
        name: &str,
        origin: Origin,
        disk_size: u64,
        file: &[u8],
        store: Box<dyn LogStore>,
    ) -> Result<(Bitmap, Header), BitmapError> {
        let (header, bits) = log::parse(file, disk_size)?;
        Ok((
            Bitmap::from_bytes(name, origin, disk_size, bits, store),
            header,
        ))
    }

    fn from_bytes(
        name: &str,
        origin: Origin,
        disk_size: u64,
        bits: &[u8],
        store: Box<dyn LogStore>,
    ) -> Bitmap {
        let blocks = log::blocks(disk_size);
        let nwords = usize::try_from(blocks.div_ceil(64)).unwrap_or(0);
        let words = (0..nwords)
            .map(|i| {
                let mut w = [0u8; 8];
                for (j, b) in w.iter_mut().enumerate() {
                    *b = bits.get(i * 8 + j).copied().unwrap_or(0);
                }
                AtomicU64::new(u64::from_le_bytes(w) & Self::word_mask(blocks, i))
            })
            .collect();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Bitmap {
            id: NEXT_ID.fetch_add(1, SeqCst),
            name: name.to_string(),
            origin,
            disk_size,
            blocks,
            words,
            pending: Mutex::default(),
            dirty: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            sync: Mutex::default(),
            store,
        }
    }

    /// Bits of word `i` that stand for blocks of the disk.
    fn word_mask(blocks: u64, i: usize) -> u64 {
        let first = u64::try_from(i).unwrap_or(u64::MAX).saturating_mul(64);
        match blocks.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The `(word, mask)` pairs covering `[offset, offset + len)`.
    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        let (first, last) = if len == 0 || offset >= self.disk_size || self.blocks == 0 {
            (1, 0) // empty
        } else {
            let end = offset.saturating_add(len).min(self.disk_size);
            (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE)
        };
        let words = if first > last {
            0..0
        } else {
            usize::try_from(first / 64).unwrap_or(0)..usize::try_from(last / 64 + 1).unwrap_or(0)
        };
        words.map(move |w| {
            let base = u64::try_from(w).unwrap_or(0) * 64;
            let lo = first.max(base) - base;
            let hi = last.min(base + 63) - base;
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            (w, mask)
        })
    }

    /// Every block of the range is marked and on disk: a write there
    /// needs nothing from this bitmap.
    pub fn covered(&self, offset: u64, len: u64) -> bool {
        // Bits first, then the counters: a writer raises `dirty` before
        // it sets bits, so bits seen set with `durable == dirty` are on disk.
        let set = self
            .spans(offset, len)
            .all(|(w, m)| self.words[w].load(SeqCst) & m == m);
        set && self.durable.load(SeqCst) == self.dirty.load(SeqCst)
    }

    /// Mark the blocks of `[offset, offset + len)` and return once they
    /// are on disk. An error means the data must not be written.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.covered(offset, len) {
            return Ok(());
        }
        let target = {
            let mut pending = lock(&self.pending);
            let spans: Vec<_> = self.spans(offset, len).collect();
            if spans
                .iter()
                .any(|&(w, m)| self.words[w].load(SeqCst) & m != m)
            {
                self.dirty.fetch_add(1, SeqCst);
                for (w, m) in spans {
                    let old = self.words[w].fetch_or(m, SeqCst);
                    if old & m != m {
                        pending.insert(w / WORDS_PER_PAGE);
                    }
                }
            }
            self.dirty.load(SeqCst)
        };
        self.persist(target)
    }

    /// Write pending pages until `durable >= target`.
    fn persist(&self, target: u64) -> io::Result<()> {
        let _one_writer = lock(&self.sync);
        if self.durable.load(SeqCst) >= target {
            return Ok(());
        }
        let (pages, epoch) = {
            let mut pending = lock(&self.pending);
            (std::mem::take(&mut *pending), self.dirty.load(SeqCst))
        };
        for &page in &pages {
            if let Err(e) = self.write_page(page) {
                // Not on disk: the next writer tries these pages again.
                lock(&self.pending).extend(pages.iter().copied());
                return Err(e);
            }
        }
        self.durable.store(epoch, SeqCst);
        Ok(())
    }

    /// Bytes of the bitmap the disk uses (the file may hold more).
    fn used_len(&self) -> usize {
        usize::try_from(log::bitmap_len(self.disk_size)).unwrap_or(0)
    }

    fn page_bytes(&self, page: usize) -> Vec<u8> {
        let start = page * PAGE;
        let end = (start + PAGE).min(self.used_len());
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        for w in &self.words[start / 8..end.div_ceil(8)] {
            out.extend_from_slice(&w.load(SeqCst).to_le_bytes());
        }
        out.truncate(end.saturating_sub(start));
        out
    }

    fn write_page(&self, page: usize) -> io::Result<()> {
        let bytes = self.page_bytes(page);
        let at = HEADER_LEN + page * PAGE;
        self.store
            .write_at(&bytes, u64::try_from(at).unwrap_or(u64::MAX))
    }

    /// Clear every bit, in memory and on disk. The caller holds the disk
    /// quiesced (no write in flight), so no write lands between the bits
    /// it marked and this clearing. A failure part way leaves the file a
    /// superset of memory, which is still safe.
    pub fn checkpoint(&self) -> io::Result<()> {
        let _one_writer = lock(&self.sync);
        let mut pending = lock(&self.pending);
        for w in &self.words {
            w.store(0, SeqCst);
        }
        let pages = self.used_len().div_ceil(PAGE);
        for page in 0..pages {
            self.write_page(page)?;
        }
        pending.clear();
        self.durable.store(self.dirty.load(SeqCst), SeqCst);
        Ok(())
    }

    /// Blocks marked now.
    pub fn dirty_blocks(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn test(&self, block: u64) -> bool {
        usize::try_from(block / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w.load(SeqCst) & (1 << (block % 64)) != 0)
    }

    /// The run starting at `offset` (at most `len` bytes, not past the
    /// disk) of bytes that are all dirty or all clean: `(bytes, dirty)`.
    /// `None` when `offset` is at or past the end of the disk.
    pub fn extent(&self, offset: u64, len: u64) -> Option<(u64, bool)> {
        if offset >= self.disk_size || len == 0 {
            return None;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let mut block = offset / BLOCK_SIZE;
        let dirty = self.test(block);
        let mut reach = (block + 1) * BLOCK_SIZE;
        while reach < end {
            block += 1;
            if self.test(block) != dirty {
                break;
            }
            reach += BLOCK_SIZE;
        }
        Some((reach.min(end) - offset, dirty))
    }
}

/// Why a bitmap could not be started or taken over.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("writing the CBT log: {0}")]
    Write(#[source] io::Error),
}
