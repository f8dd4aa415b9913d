//! Raw images (tap-ctl's `aio:`): the file is the disk, byte for byte.

use super::stats::LayerCounters;
use super::{
    Backing, DirectFile, Extent, Image, ImageError, LayerStats, Mapping, SyncFiles, Target,
};

#[derive(Debug)]
pub struct RawImage {
    file: Box<dyn Backing>,
    name: String,
    size: u64,
    read_only: bool,
    counters: LayerCounters,
}

impl RawImage {
    /// The virtual size is the file's length at open time.
    pub fn open(file: Box<dyn Backing>, name: &str, read_only: bool) -> Result<Self, ImageError> {
        let size = file.len().map_err(|source| ImageError::Io {
            op: "stat",
            offset: 0,
            source,
        })?;
        Ok(RawImage {
            file,
            name: name.to_string(),
            size,
            read_only,
            counters: LayerCounters::default(),
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ImageError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), ImageError> {
        if self.read_only {
            Err(ImageError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Zero by writing zeroes, when punching holes is not available.
    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), ImageError> {
        use super::zeroes::{ZEROES, ZERO_CHUNK};
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file
                .write_all_at(&ZEROES[..n], offset)
                .map_err(|source| ImageError::Io {
                    op: "write",
                    offset,
                    source,
                })?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl Image for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.check_range(offset, buf.len() as u64)?;
        let r = self
            .file
            .read_exact_at(buf, offset)
            .map_err(|source| ImageError::Io {
                op: "read",
                offset,
                source,
            });
        self.counters.on_read(buf.len() as u64, r)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        let done = self.check_range(offset, buf.len() as u64).is_ok()
            && self.file.read_exact_at_nowait(buf, offset);
        if done {
            self.counters.read(buf.len() as u64);
        }
        done
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let r = self
            .file
            .write_all_at(buf, offset)
            .map_err(|source| ImageError::Io {
                op: "write",
                offset,
                source,
            });
        self.counters.on_write(buf.len() as u64, r)
    }

    fn flush(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| ImageError::Io {
            op: "fsync",
            offset: 0,
            source,
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if may_unmap {
            match self.file.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
                Err(source) => {
                    return Err(ImageError::Io {
                        op: "punch hole",
                        offset,
                        source,
                    })
                }
            }
        }
        self.write_zero_bytes(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.check_range(offset, len)?;
        // A raw file's holes are the filesystem's business; report data.
        Ok(Extent {
            len,
            allocated: true,
            zero: false,
        })
    }

    fn stats(&self) -> Vec<LayerStats> {
        vec![self.counters.snapshot(&self.name, "aio")]
    }

    fn direct_files(&self) -> Vec<DirectFile> {
        self.file.direct_fd().into_iter().collect()
    }

    /// A raw image is its file: every in-range request maps one to one.
    /// Nothing is ever deallocated under a mapping (a discard punches a
    /// hole, which a concurrent write simply fills again), so no pins.
    fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<Mapping> {
        if len == 0 || (write && self.read_only) || self.check_range(offset, len).is_err() {
            return None;
        }
        self.file.direct_fd()?;
        let mut m = Mapping::new(write);
        m.push(len, Target::File { file: 0, offset });
        Some(m)
    }

    fn direct_done(&self, mapping: &Mapping, ok: bool) {
        let r = if ok { Ok(()) } else { Err(()) };
        if mapping.is_write() {
            let _ = self.counters.on_write(mapping.total(), r);
        } else {
            let _ = self.counters.on_read(mapping.total(), r);
        }
    }

    fn direct_sync(&self) -> Option<SyncFiles> {
        Some(SyncFiles(u64::from(!self.read_only)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw_with(bytes: &[u8]) -> (tempfile::NamedTempFile, RawImage) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = f.reopen().unwrap();
        let img = RawImage::open(Box::new(file), "t", false).unwrap();
        (f, img)
    }

    #[test]
    fn raw_reads_and_writes_the_file_directly() {
        let (_f, img) = raw_with(&[7u8; 4096]);
        assert_eq!(img.virtual_size(), 4096);
        img.write_at(b"hello", 1000).unwrap();
        let mut buf = [0u8; 7];
        img.read_at(&mut buf, 999).unwrap();
        assert_eq!(&buf, b"\x07hello\x07");
        assert_eq!(img.stats()[0].hits, [1, 1]);
    }

    #[test]
    fn raw_rejects_access_past_the_end() {
        let (_f, img) = raw_with(&[0u8; 512]);
        let mut buf = [0u8; 2];
        assert!(matches!(
            img.read_at(&mut buf, 511),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&buf, u64::MAX),
            Err(ImageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn raw_write_zeroes_reads_back_zero() {
        let (_f, img) = raw_with(&[9u8; 8192]);
        img.write_zeroes(4096, 4096, true).unwrap();
        img.write_zeroes(0, 100, false).unwrap();
        let mut buf = vec![1u8; 8192];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert!(buf[100..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn raw_read_only_refuses_writes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(512).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", true).unwrap();
        assert!(matches!(img.write_at(&[1], 0), Err(ImageError::ReadOnly)));
        assert!(matches!(img.discard(0, 512), Err(ImageError::ReadOnly)));
    }
}
