//! `tap-ctl vhd convert`: copy a virtual disk into a new raw file or VHD,
//! sparse-aware both ways: holes of the source (from its BAT) are skipped
//! without reading, and all-zero stretches of data are not written, so
//! they stay holes in the output.
//!
//! The output is written by one stream (buffered writes to one file
//! serialize on its inode lock), so everything else is kept off it: a
//! reader thread fetches allocated extents in cache-sized chunks and finds
//! the non-zero runs, and a raw output's space is allocated run by run
//! just before the run is written (skipping delayed allocation). What was
//! measured, and the designs tried and dropped: `bench/README.md`.

use crate::{Image, ImageError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc;

/// Bytes the reader hands to the writer at once: small enough that the
/// data is still in the CPU cache when the writer copies it out (the
/// reader runs at most [`IN_FLIGHT`] chunks ahead).
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the writer.
const IN_FLIGHT: usize = 4;
/// Granularity of zero detection (qemu-img's default `-S 4k`), aligned to
/// virtual offsets so that holes in the output are whole pages.
const ZERO_GRAIN: u64 = 4096;
/// Runs shorter than this are written without preallocating: for a few
/// pages the extra system call costs more than delayed allocation.
const PREALLOC_MIN: usize = 64 << 10;

/// Where converted data goes.
pub trait Sink: Sync {
    /// Write `data` at virtual offset `offset`.
    fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError>;
}

/// A raw file: virtual offset = file offset.
#[derive(Debug)]
pub struct RawSink<'a>(pub &'a File);

/// `fallocate(mode 0)`: allocate blocks for the range without changing
/// the file size (the output was already sized).
fn allocate_fd(fd: i32, offset: u64, len: u64) -> std::io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let len = i64::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: fallocate takes plain integers; an invalid fd only yields EBADF.
    if unsafe { libc::fallocate(fd, 0, off, len) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Sink for RawSink<'_> {
    fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
        if data.len() >= PREALLOC_MIN {
            // Best effort: a filesystem that cannot preallocate (or is
            // full, which the write then reports) is written as it is.
            let _ = allocate_fd(self.0.as_raw_fd(), offset, data.len() as u64);
        }
        self.0
            .write_all_at(data, offset)
            .map_err(ImageError::io("write", offset))
    }
}

/// Any writable image.
#[derive(Debug)]
pub struct ImageSink<'a>(pub &'a dyn Image);

impl Sink for ImageSink<'_> {
    fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
        self.0.write_at(data, offset)
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (head, mid, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only hands
        // out properly aligned, in-bounds middle parts.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// The non-zero runs of `data`, which holds the bytes at virtual offset
/// `offset`, as `(start, end)` indices into `data`. Zero detection works
/// on [`ZERO_GRAIN`]s aligned to virtual offsets (the first and last
/// grain may be partial); each reported run is a union of whole grains.
fn nonzero_runs(data: &[u8], offset: u64, out: &mut Vec<(usize, usize)>) {
    let mut i = 0usize;
    let mut run: Option<usize> = None;
    while i < data.len() {
        let to_grain_end = ZERO_GRAIN - (offset + i as u64) % ZERO_GRAIN;
        let end = data.len().min(i + to_grain_end as usize);
        match (is_zero(&data[i..end]), run) {
            (false, None) => run = Some(i),
            (true, Some(start)) => {
                out.push((start, i));
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(start) = run {
        out.push((start, data.len()));
    }
}

/// A chunk read by the reader thread: its `data` (allocated once, never
/// cleared: only bytes just read are handed on), the non-zero `runs` to
/// write as `(virtual offset, start, end)` into `data`, and how far
/// through the disk the reader had got.
#[derive(Debug, Default)]
struct Chunk {
    data: Vec<u8>,
    runs: Vec<(u64, usize, usize)>,
    done: u64,
}

impl Chunk {
    /// Record the non-zero runs of `data[at..at + len]` (virtual `offset`),
    /// merging with the previous run where both are contiguous.
    fn add_piece(&mut self, offset: u64, at: usize, len: usize, scratch: &mut Vec<(usize, usize)>) {
        scratch.clear();
        nonzero_runs(&self.data[at..at + len], offset, scratch);
        for &(s, e) in scratch.iter() {
            let (voff, start, end) = (offset + s as u64, at + s, at + e);
            match self.runs.last_mut() {
                Some((pv, ps, pe)) if *pe == start && *pv + (*pe - *ps) as u64 == voff => *pe = end,
                _ => self.runs.push((voff, start, end)),
            }
        }
    }
}

/// Copy every allocated, non-zero byte of `src` into `sink`.
/// `progress(done, total)` reports virtual byte positions.
pub fn copy_image(
    src: &dyn Image,
    sink: &dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = src.virtual_size();
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<Chunk, ImageError>>(IN_FLIGHT);
    let (free_tx, free_rx) = mpsc::channel::<Chunk>();
    for _ in 0..IN_FLIGHT + 1 {
        let _ = free_tx.send(Chunk {
            data: vec![0u8; CHUNK],
            ..Chunk::default()
        });
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let fail = |e| {
                let _ = full_tx.send(Err(e));
            };
            let mut scratch = Vec::new();
            let mut off = 0u64;
            let mut used = 0usize;
            let Ok(mut chunk) = free_rx.recv() else {
                return;
            };
            while off < size {
                let ext = match src.block_status(off, (size - off).min(1 << 30)) {
                    Ok(e) => e,
                    Err(e) => return fail(e),
                };
                let end = off + ext.len.clamp(1, size - off);
                if ext.allocated && !ext.zero {
                    while off < end {
                        let n = (end - off).min((chunk.data.len() - used) as u64) as usize;
                        if let Err(e) = src.read_at(&mut chunk.data[used..used + n], off) {
                            return fail(e);
                        }
                        chunk.add_piece(off, used, n, &mut scratch);
                        used += n;
                        off += n as u64;
                        if used == chunk.data.len() {
                            chunk.done = off;
                            if full_tx.send(Ok(chunk)).is_err() {
                                return;
                            }
                            let Ok(c) = free_rx.recv() else { return };
                            chunk = c;
                            used = 0;
                        }
                    }
                }
                off = end;
            }
            chunk.done = size;
            let _ = full_tx.send(Ok(chunk));
        });
        for msg in full_rx {
            let mut chunk = msg?;
            for &(off, start, end) in &chunk.runs {
                sink.write(&chunk.data[start..end], off)?;
            }
            progress(chunk.done, size);
            chunk.runs.clear();
            let _ = free_tx.send(chunk);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_is_exact() {
        let mut b = vec![0u8; 10000];
        assert!(is_zero(&b));
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&b[1..9999]));
    }

    fn runs(data: &[u8], offset: u64) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        nonzero_runs(data, offset, &mut v);
        v
    }

    #[test]
    fn nonzero_runs_skip_zero_grains_aligned_to_virtual_offsets() {
        let g = ZERO_GRAIN as usize;
        // Virtual offset 1000: the first grain is the 3096 bytes up to 4096.
        let head = g - 1000;
        let mut b = vec![0u8; head + 5 * g + 100];
        b[head + 5] = 1; // grain 1 (first whole grain)
        b[head + 2 * g] = 2; // grain 3
        b[head + 2 * g + g - 1] = 2; // still grain 3
        b[head + 3 * g] = 3; // grain 4, adjacent: merged with grain 3
        b[head + 5 * g + 99] = 4; // the partial last grain
        assert_eq!(
            runs(&b, 1000),
            vec![
                (head, head + g),
                (head + 2 * g, head + 4 * g),
                (head + 5 * g, b.len())
            ]
        );
        b[0] = 9; // the partial first grain, adjacent to grain 1
        assert_eq!(runs(&b, 1000)[0], (0, head + g));
    }

    #[test]
    fn nonzero_runs_all_zero_or_empty_is_nothing() {
        assert!(runs(&[0u8; 3 * ZERO_GRAIN as usize + 7], 512).is_empty());
        assert!(runs(&[], 0).is_empty());
        assert_eq!(runs(&[1u8; 10], 4090), vec![(0, 10)]);
    }

    #[test]
    fn chunk_merges_runs_contiguous_in_disk_and_buffer_only() {
        let g = ZERO_GRAIN as usize;
        let mut c = Chunk {
            data: vec![1u8; 4 * g],
            ..Chunk::default()
        };
        let mut scratch = Vec::new();
        c.add_piece(0, 0, g, &mut scratch);
        // Contiguous on disk and in the buffer: one run.
        c.add_piece(g as u64, g, g, &mut scratch);
        // Next in the buffer but not on disk (a hole was skipped): new run.
        c.add_piece(10 * g as u64, 2 * g, 2 * g, &mut scratch);
        assert_eq!(c.runs, vec![(0, 0, 2 * g), (10 * g as u64, 2 * g, 4 * g)]);
    }
}
