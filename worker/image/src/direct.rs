//! Direct mappings: the part of a request an image can hand out as plain
//! positioned I/O on its own files, so that a frontend with its own
//! io_uring (ublk) can keep many requests in flight without a thread per
//! request.
//!
//! The synchronous [`Image`](super::Image) API stays the reference: it
//! allocates, read-modify-writes bitmaps, walks chains and keeps metadata
//! crash safe. [`Image::map_direct`](super::Image::map_direct) only answers
//! the common case where none of that is needed — the bytes already live at
//! known file offsets (or read as zero) and writing them changes no
//! metadata — from metadata already in memory, without doing I/O itself.
//! Everything else returns `None` and goes through the synchronous API.
//!
//! # Lifetime of a mapping
//! A [`Mapping`] names file ranges that belong to specific blocks of a
//! VHD. Those ranges must keep belonging to them until the I/O is done, so
//! a mapping *pins* the blocks it touches ([`Pins`]); a discard that would
//! deallocate a pinned block zeroes it by writing instead (see
//! `VhdLayer::deallocate_unless`). Dropping the mapping releases the pins.
//! The image itself (and so its files) is kept alive by the frontend for
//! the request's whole life through `Disk`'s admission ticket, which also
//! makes `pause`/`close` wait for it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Most pieces one mapping may have; a request needing more is served by
/// the synchronous path (it is then badly fragmented anyway).
pub const MAX_SEGMENTS: usize = 8;

/// Most files a direct-capable image exposes (a whole VHD chain).
pub const MAX_DIRECT_FILES: usize = super::vhd::MAX_CHAIN_DEPTH;

/// A file a mapping may point into, as [`Image::direct_files`] lists them.
///
/// [`Image::direct_files`]: super::Image::direct_files
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFile {
    /// The open file; valid for as long as the image that listed it.
    pub fd: RawFd,
    /// The fd has `O_DIRECT`: memory, offsets and lengths must be
    /// 512-byte aligned (ublk's sector-sized requests into page-aligned
    /// buffers always are).
    pub o_direct: bool,
}

/// Where one piece of a request lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// At `offset` in file number `file` of [`Image::direct_files`].
    ///
    /// [`Image::direct_files`]: super::Image::direct_files
    File { file: usize, offset: u64 },
    /// Reads as zeroes (an unallocated range at the root of a chain).
    /// Only in read mappings.
    Zero,
}

/// One contiguous piece of a request, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Bytes, > 0.
    pub len: u64,
    pub target: Target,
}

/// Pin counters of one image's blocks, striped: a block hashes to one of
/// [`PIN_STRIPES`] counters. A collision only makes a discard zero a block
/// by writing instead of deallocating it, never the reverse.
#[derive(Debug)]
pub struct Pins {
    stripes: Box<[AtomicU32]>,
}

/// Stripes of [`Pins`]: with at most a few hundred requests in flight the
/// chance that a discarded block shares a stripe with one of them stays low.
pub const PIN_STRIPES: usize = 4096;

impl Default for Pins {
    fn default() -> Self {
        Pins {
            stripes: (0..PIN_STRIPES).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl Pins {
    fn stripe(block: u64) -> usize {
        // Blocks of one request are consecutive: spread them.
        (block % PIN_STRIPES as u64) as usize
    }

    /// Whether a mapping may point into `block`. Called by the deallocator
    /// under the lock that orders it against mappers (see
    /// `VhdLayer::deallocate_unless`), with sequentially consistent loads
    /// so that a pin taken before a mapper looked at the BAT is seen.
    pub fn busy(&self, block: u64) -> bool {
        self.stripes[Self::stripe(block)].load(Ordering::SeqCst) != 0
    }

    fn pin(&self, block: u64) {
        self.stripes[Self::stripe(block)].fetch_add(1, Ordering::SeqCst);
    }

    fn unpin(&self, block: u64) {
        self.stripes[Self::stripe(block)].fetch_sub(1, Ordering::Release);
    }
}

/// Blocks a mapping holds pinned; released on drop.
#[derive(Debug)]
struct PinSet {
    pins: Arc<Pins>,
    first: u64,
    count: u64,
}

impl Drop for PinSet {
    fn drop(&mut self) {
        for b in self.first..self.first + self.count {
            self.pins.unpin(b);
        }
    }
}

/// The physical location of a whole request: up to [`MAX_SEGMENTS`]
/// pieces, in order, covering exactly the requested length.
#[derive(Debug)]
pub struct Mapping {
    segments: [Segment; MAX_SEGMENTS],
    len: usize,
    write: bool,
    pinned: Option<PinSet>,
}

impl Mapping {
    /// An empty mapping for a read (`write` false) or a write.
    pub fn new(write: bool) -> Mapping {
        Mapping {
            segments: [Segment {
                len: 0,
                target: Target::Zero,
            }; MAX_SEGMENTS],
            len: 0,
            write,
            pinned: None,
        }
    }

    /// Append a piece, merging it with the previous one when they are
    /// contiguous. False when the mapping is full (the caller gives up).
    pub fn push(&mut self, len: u64, target: Target) -> bool {
        if len == 0 {
            return true;
        }
        if let Some(last) = self.len.checked_sub(1).map(|i| &mut self.segments[i]) {
            let merged = match (last.target, target) {
                (Target::Zero, Target::Zero) => true,
                (Target::File { file: a, offset: x }, Target::File { file: b, offset: y }) => {
                    a == b && x.checked_add(last.len) == Some(y)
                }
                _ => false,
            };
            if merged {
                last.len += len;
                return true;
            }
        }
        if self.len == MAX_SEGMENTS || (self.write && target == Target::Zero) {
            return false;
        }
        self.segments[self.len] = Segment { len, target };
        self.len += 1;
        true
    }

    /// Pin blocks `first..first + count` of `pins` for this mapping's life.
    /// Must happen *before* the mapper looks the blocks up (see [`Pins::busy`]).
    pub fn pin(&mut self, pins: &Arc<Pins>, first: u64, count: u64) {
        debug_assert!(self.pinned.is_none());
        for b in first..first + count {
            pins.pin(b);
        }
        self.pinned = Some(PinSet {
            pins: pins.clone(),
            first,
            count,
        });
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.len]
    }

    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Total bytes mapped.
    pub fn total(&self) -> u64 {
        self.segments().iter().map(|s| s.len).sum()
    }
}

/// The files a FLUSH must `fdatasync` when nothing but a data sync is
/// needed to make every completed write durable, as a bit set of
/// [`Image::direct_files`] indices (0: nothing to do).
///
/// [`Image::direct_files`]: super::Image::direct_files
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncFiles(pub u64);

impl SyncFiles {
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.0 & (1 << i) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(file: usize, offset: u64) -> Target {
        Target::File { file, offset }
    }

    #[test]
    fn mapping_merges_contiguous_pieces_and_caps_the_count() {
        let mut m = Mapping::new(false);
        assert!(m.push(512, file(0, 1024)));
        assert!(m.push(512, file(0, 1536)));
        assert!(m.push(512, Target::Zero));
        assert!(m.push(512, Target::Zero));
        assert!(m.push(512, file(1, 2048)));
        assert_eq!(
            m.segments(),
            &[
                Segment {
                    len: 1024,
                    target: file(0, 1024)
                },
                Segment {
                    len: 1024,
                    target: Target::Zero
                },
                Segment {
                    len: 512,
                    target: file(1, 2048)
                },
            ]
        );
        assert_eq!(m.total(), 2560);
        let mut m = Mapping::new(false);
        for i in 0..MAX_SEGMENTS as u64 {
            assert!(m.push(512, file(0, i * 4096)));
        }
        assert!(!m.push(512, file(0, 1 << 30)), "one piece too many");
    }

    #[test]
    fn write_mapping_refuses_zero_pieces() {
        let mut m = Mapping::new(true);
        assert!(!m.push(512, Target::Zero));
    }

    #[test]
    fn pins_are_held_while_the_mapping_lives() {
        let pins = Arc::new(Pins::default());
        let mut m = Mapping::new(true);
        m.pin(&pins, 7, 2);
        assert!(pins.busy(7) && pins.busy(8) && !pins.busy(9));
        drop(m);
        assert!(!pins.busy(7) && !pins.busy(8));
    }

    #[test]
    fn sync_files_lists_set_bits() {
        assert_eq!(SyncFiles(0b101).iter().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(SyncFiles::default().iter().count(), 0);
    }
}
