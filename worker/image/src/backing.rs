//! The file an image layer lives in, as the engine sees it.
//!
//! The engine never opens paths; it works on whatever [`Backing`] it is
//! handed. Offline tools hand it a [`std::fs::File`]; the confined worker
//! hands it an io_uring-driven file built on an fd the broker opened.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positioned I/O on one image file. Implementations must be safe to call
/// from several threads at once.
#[allow(clippy::len_without_is_empty)] // a file of length 0 is just a short file
pub trait Backing: Send + Sync + std::fmt::Debug {
    /// Read exactly `buf.len()` bytes at `offset`; a short file is an
    /// `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make written data durable (fdatasync semantics).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Give the range's space back to the filesystem; it reads as zeroes
    /// afterwards. Filesystems without hole punching return `Unsupported`.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The open file underneath, for frontends that queue their own I/O
    /// on it (see [`super::direct`]); `None` if there is none.
    fn direct_fd(&self) -> Option<super::DirectFile> {
        None
    }
    /// Read exactly `buf.len()` bytes at `offset` only if that needs no
    /// waiting for a device (page-cache hits); `false` when it would wait
    /// or fails in any way, and then `buf` holds unspecified bytes. Lets a
    /// frontend answer cache hits on the thread that received the request
    /// (see [`crate::Image::read_at_nowait`]). Default: never.
    fn read_exact_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        let _ = (buf, offset);
        false
    }
    /// Last modification of the file, seconds since the Unix epoch:
    /// what a differencing child records of its parent, and what a read
    /// cache checks its parent against. `None` when unknown.
    fn modified_secs(&self) -> Option<i64> {
        None
    }
}

/// One file shared by several owners (a layer and the code that may
/// rewrite it, or an old leaf read at two moments): every call goes to it.
impl<B: Backing + ?Sized> Backing for std::sync::Arc<B> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn direct_fd(&self) -> Option<super::DirectFile> {
        (**self).direct_fd()
    }
    fn read_exact_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        (**self).read_exact_at_nowait(buf, offset)
    }
    fn modified_secs(&self) -> Option<i64> {
        (**self).modified_secs()
    }
}

impl Backing for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        let m = self.metadata()?;
        if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
            // stat gives 0 for a block device; its end is its size. All
            // I/O here is positioned, so moving the offset is harmless.
            use std::io::Seek;
            return (&mut &*self).seek(io::SeekFrom::End(0));
        }
        Ok(m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_hole_fd(self.as_raw_fd(), offset, len)
    }

    fn modified_secs(&self) -> Option<i64> {
        use std::os::unix::fs::MetadataExt;
        self.metadata().ok().map(|m| m.mtime())
    }

    fn direct_fd(&self) -> Option<super::DirectFile> {
        let fd = self.as_raw_fd();
        // SAFETY: F_GETFL takes no argument; an invalid fd only yields EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        (flags >= 0).then_some(super::DirectFile {
            fd,
            o_direct: flags & libc::O_DIRECT != 0,
        })
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a raw fd.
pub fn punch_hole_fd(fd: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate takes plain integers; an invalid fd only yields EBADF.
    let rc = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Err(io::Error::new(io::ErrorKind::Unsupported, err)),
            _ => Err(err),
        }
    }
}
