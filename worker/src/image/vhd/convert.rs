//! `tap-ctl vhd convert`: copy a virtual disk into a new raw file or VHD,
//! sparse-aware both ways: holes of the source (from its BAT) are skipped
//! without reading, and all-zero stretches of data are not written, so
//! they stay holes in the output.
//!
//! A reader thread fetches allocated extents in large sequential reads
//! while the writer thread checks for zeroes and writes, so that reading
//! and writing overlap.

use crate::image::{Backing, Image, ImageError};
use std::sync::mpsc;

/// Bytes handed from the reader to the writer at once (several extents).
const BATCH: u64 = 16 << 20;
/// Granularity of zero detection (qemu-img's default `-S 4k`).
const ZERO_GRAIN: usize = 4096;
/// Batches in flight between reader and writer.
const DEPTH: usize = 2;

/// Where converted data goes.
pub trait Sink: Sync {
    /// Write `data` at virtual offset `offset`.
    fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError>;
}

/// A raw file: virtual offset = file offset.
#[derive(Debug)]
pub struct RawSink<'a>(pub &'a dyn Backing);

impl Sink for RawSink<'_> {
    fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
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

/// Write the non-zero parts of `data` (at `offset`).
fn write_nonzero(sink: &dyn Sink, data: &[u8], offset: u64) -> Result<(), ImageError> {
    let mut i = 0;
    while i < data.len() {
        // Skip zero grains.
        while i < data.len() && is_zero(&data[i..(i + ZERO_GRAIN).min(data.len())]) {
            i += ZERO_GRAIN;
        }
        if i >= data.len() {
            break;
        }
        let start = i;
        while i < data.len() && !is_zero(&data[i..(i + ZERO_GRAIN).min(data.len())]) {
            i += ZERO_GRAIN;
        }
        let end = i.min(data.len());
        sink.write(&data[start..end], offset + start as u64)?;
    }
    Ok(())
}

/// A batch of extents read by the reader thread: pieces `(offset, len)`
/// stored back to back in the first `used` bytes of `data` (allocated
/// once, never cleared: every byte handed on was just read), and how far
/// the reader has got.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<u8>,
    used: usize,
    pieces: Vec<(u64, usize)>,
    done: u64,
}

/// Copy every allocated, non-zero byte of `src` into `sink`.
/// `progress(done, total)` reports virtual byte positions.
pub fn copy_image(
    src: &dyn Image,
    sink: &dyn Sink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = src.virtual_size();
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<Batch, ImageError>>(DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Batch>();
    for _ in 0..DEPTH + 1 {
        let _ = free_tx.send(Batch {
            data: vec![0u8; BATCH as usize],
            ..Batch::default()
        });
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let fail = |e| {
                let _ = full_tx.send(Err(e));
            };
            let mut off = 0u64;
            let Ok(mut batch) = free_rx.recv() else {
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
                        let at = batch.used;
                        let n = (end - off).min((batch.data.len() - at) as u64) as usize;
                        if let Err(e) = src.read_at(&mut batch.data[at..at + n], off) {
                            return fail(e);
                        }
                        batch.pieces.push((off, n));
                        batch.used += n;
                        off += n as u64;
                        if batch.used == batch.data.len() {
                            batch.done = off;
                            if full_tx.send(Ok(batch)).is_err() {
                                return;
                            }
                            let Ok(b) = free_rx.recv() else { return };
                            batch = b;
                        }
                    }
                }
                off = end;
            }
            batch.done = size;
            let _ = full_tx.send(Ok(batch));
        });
        for msg in full_rx {
            let mut batch = msg?;
            let mut at = 0;
            for &(off, len) in &batch.pieces {
                write_nonzero(sink, &batch.data[at..at + len], off)?;
                at += len;
            }
            progress(batch.done, size);
            batch.used = 0;
            batch.pieces.clear();
            let _ = free_tx.send(batch);
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

    struct Recorder(std::sync::Mutex<Vec<(u64, usize)>>);
    impl Sink for Recorder {
        fn write(&self, data: &[u8], offset: u64) -> Result<(), ImageError> {
            self.0.lock().unwrap().push((offset, data.len()));
            Ok(())
        }
    }

    #[test]
    fn write_nonzero_skips_zero_grains() {
        let mut b = vec![0u8; 5 * ZERO_GRAIN + 100];
        b[ZERO_GRAIN + 5] = 1;
        b[3 * ZERO_GRAIN] = 2;
        b[5 * ZERO_GRAIN + 99] = 3;
        let r = Recorder(Default::default());
        write_nonzero(&r, &b, 1000).unwrap();
        assert_eq!(
            r.0.into_inner().unwrap(),
            vec![
                (1000 + ZERO_GRAIN as u64, ZERO_GRAIN),
                (1000 + 3 * ZERO_GRAIN as u64, ZERO_GRAIN),
                (1000 + 5 * ZERO_GRAIN as u64, 100)
            ]
        );
    }
}
