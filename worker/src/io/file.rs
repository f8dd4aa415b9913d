//! [`UringFile`]: the [`Backing`] a confined worker runs its images on.
//!
//! # Rings
//! Requests run on the process's pool of restricted rings (see
//! [`super::pool`]), in which each open file has a slot. A request takes an
//! idle ring, submits, waits, and puts it back, so as many requests are in
//! flight as there are rings and threads calling in (the NBD frontend's
//! pool, ublk's slow path), each with one `io_uring_enter` per operation.
//! No ring is shared between two requests at the same time, so there is no
//! completion routing and no extra thread hop.
//!
//! # Direct or buffered
//! [`CacheMode::Auto`] turns `O_DIRECT` on (with `F_SETFL`, on the open file
//! description we were handed) when all of these hold, and otherwise stays
//! buffered:
//! - the filesystem accepts `O_DIRECT` (tmpfs and some FUSE filesystems
//!   refuse it);
//! - a 512-byte-aligned direct read works, i.e. the device's logical block is
//!   512 bytes: every format we serve is laid out in 512-byte sectors (VHD
//!   blocks start one bitmap sector after a sector boundary), so with 4 KiB
//!   logical blocks most VHD I/O would need read-modify-write — buffered is
//!   the better choice there;
//! - the file's length is a multiple of 512 (a VHD with a 511-byte footer is
//!   served buffered).
//!
//! With `O_DIRECT`, requests whose offset, length or memory are not
//! 512-aligned (rare: sub-sector metadata updates) go through an aligned
//! bounce buffer; unaligned writes do read-modify-write of their first and
//! last sector under a striped lock so that two such writes to different
//! bytes of one sector cannot undo each other. Durability does not depend on
//! the mode: `sync_data` is an io_uring `FSYNC(DATASYNC)` either way.
//! Buffered *writes* are the one operation not sent through the rings; see
//! `pwrite` in this file for why.
//! Direct I/O keeps tenant data out of the host page cache (no double
//! caching with the guest, no cross-tenant cache pressure), as blktap does.

use super::buf::AlignedBuf;
use super::pool::Slot;
use super::ring::Ring;
use crate::image::Backing;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

/// Sector size all direct I/O is aligned to.
pub const DIRECT_ALIGN: u64 = 512;
/// Largest single io_uring read/write (the SQE length is 32-bit).
const MAX_OP: usize = 1 << 30;
/// Stripes of the read-modify-write lock.
const STRIPES: usize = 64;

/// Whether to try `O_DIRECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Direct where the file and device allow it (see module doc).
    #[default]
    Auto,
    /// Always through the page cache.
    Buffered,
}

/// An image file driven by io_uring. Safe to use from many threads.
pub struct UringFile {
    fd: OwnedFd,
    direct: bool,
    /// This file's slot in every ring of the pool.
    slot: Slot,
    stripes: Vec<Mutex<()>>,
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("fd", &self.fd.as_raw_fd())
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn aligned(x: u64) -> bool {
    x & (DIRECT_ALIGN - 1) == 0
}

impl UringFile {
    /// Take over `fd` (an image file opened by the broker or the
    /// standalone parent). Claims the file's slot in the ring pool, which
    /// fails here, clearly, on a host without io_uring rather than on the
    /// first request.
    pub fn new(fd: OwnedFd, mode: CacheMode) -> io::Result<UringFile> {
        let mut file = UringFile {
            fd,
            direct: false,
            slot: Slot::claim()?,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };
        if mode == CacheMode::Auto {
            file.direct = file.try_direct()?;
        }
        Ok(file)
    }

    /// Whether this file does direct I/O.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Turn O_DIRECT on if the rules in the module doc allow it.
    fn try_direct(&self) -> io::Result<bool> {
        let len = self.len()?;
        if len < DIRECT_ALIGN || !aligned(len) {
            return Ok(false);
        }
        let flags = fcntl(self.raw(), libc::F_GETFL, 0)?;
        if flags & libc::O_DIRECT == 0
            && fcntl(self.raw(), libc::F_SETFL, flags | libc::O_DIRECT).is_err()
        {
            return Ok(false);
        }
        let mut probe = AlignedBuf::zeroed(DIRECT_ALIGN as usize);
        match self.op_read(&mut probe, 0) {
            Ok(n) if n == DIRECT_ALIGN as usize => Ok(true),
            _ => {
                fcntl(self.raw(), libc::F_SETFL, flags & !libc::O_DIRECT)?;
                Ok(false)
            }
        }
    }

    /// Run `f` on an idle ring of the pool, with this file in its slot.
    fn with_ring<T>(&self, f: impl FnOnce(&mut Ring) -> io::Result<T>) -> io::Result<T> {
        self.slot.with_ring(self.raw(), f)
    }

    /// This file in SQEs.
    fn fixed(&self) -> types::Fixed {
        types::Fixed(self.slot.index())
    }

    /// One read of at most MAX_OP bytes; returns bytes read (0 at EOF).
    fn op_read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = buf.len().min(MAX_OP);
        let entry = opcode::Read::new(self.fixed(), buf.as_mut_ptr(), len as u32)
            .offset(offset)
            .build();
        // SAFETY: buf is exclusively borrowed for the whole call and `run`
        // returns only after the read completed.
        let n = self.with_ring(|r| unsafe { r.run(entry) })?;
        Ok(n as usize)
    }

    /// One write of at most MAX_OP bytes; returns bytes written.
    fn op_write(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let len = buf.len().min(MAX_OP);
        if !self.direct {
            return pwrite(self.raw(), &buf[..len], offset);
        }
        let entry = opcode::Write::new(self.fixed(), buf.as_ptr(), len as u32)
            .offset(offset)
            .build();
        // SAFETY: buf is borrowed for the whole call and `run` returns only
        // after the write completed.
        let n = self.with_ring(|r| unsafe { r.run(entry) })?;
        Ok(n as usize)
    }

    /// Read as much of `buf` as the file has from `offset`; returns the
    /// count (short only at end of file).
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = self.op_read(&mut buf[done..], at)?;
            if n == 0 {
                break;
            }
            done += n;
            if self.direct && !aligned(done as u64) {
                break; // a direct read stops short only at end of file
            }
        }
        Ok(done)
    }

    fn write_all_direct_or_buffered(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = self.op_write(&buf[done..], at)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }

    fn needs_bounce(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        self.direct && !(aligned(ptr as u64) && aligned(len as u64) && aligned(offset))
    }

    /// The sector-aligned range covering `len` bytes at `offset`.
    fn cover(offset: u64, len: usize) -> io::Result<(u64, u64)> {
        let start = offset - offset % DIRECT_ALIGN;
        let end = offset
            .checked_add(len as u64)
            .and_then(|e| e.checked_next_multiple_of(DIRECT_ALIGN))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok((start, end))
    }

    fn bounce_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, end) = Self::cover(offset, buf.len())?;
        let mut tmp = AlignedBuf::zeroed(usize::try_from(end - start).map_err(io::Error::other)?);
        let got = self.read_upto(&mut tmp, start)?;
        let skip = (offset - start) as usize;
        if got < skip + buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn bounce_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = Self::cover(offset, buf.len())?;
        // Lock the stripes of the first and last sector: only those hold
        // bytes outside this write. Lock in index order to avoid deadlock.
        let mut idx = [
            ((start / DIRECT_ALIGN) as usize) % STRIPES,
            (((end - DIRECT_ALIGN) / DIRECT_ALIGN) as usize) % STRIPES,
        ];
        idx.sort_unstable();
        let _a = lock(&self.stripes[idx[0]]);
        let _b = (idx[1] != idx[0]).then(|| lock(&self.stripes[idx[1]]));
        let old_len = self.len()?;
        let mut tmp = AlignedBuf::zeroed(usize::try_from(end - start).map_err(io::Error::other)?);
        let skip = (offset - start) as usize;
        let head_partial = skip != 0;
        let tail_partial = (skip + buf.len()) as u64 != end - start;
        if head_partial || tail_partial {
            // Past-EOF bytes stay zero.
            self.read_upto(&mut tmp, start)?;
        }
        tmp[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_all_direct_or_buffered(&tmp, start)?;
        let want = offset + buf.len() as u64;
        if end > old_len && want < end {
            // The sector rounding grew the file past what was written.
            self.set_len(old_len.max(want))?;
        }
        Ok(())
    }
}

/// A buffered write with `pwrite(2)`. Buffered io_uring writes on ext4
/// (and most filesystems) cannot be done without blocking, so io_uring
/// hands every one to a kernel worker thread and wakes us when it is done:
/// two extra context switches per write, measured at about a third of the
/// throughput of 4 KiB writes. `pwrite` on the fd we hold does the same
/// work inline. Direct writes, reads (page-cache hits complete inline),
/// fsync and fallocate stay on the restricted rings.
fn pwrite(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: buf is valid for reads of its length for the call.
        let n = unsafe { libc::pwrite64(fd, buf.as_ptr().cast(), buf.len(), off) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fcntl(fd: RawFd, cmd: libc::c_int, arg: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL/F_SETFL take an integer argument only.
    let rc = unsafe { libc::fcntl(fd, cmd, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl Backing for UringFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            return self.bounce_read(buf, offset);
        }
        if self.read_upto(buf, offset)? < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            return self.bounce_write(buf, offset);
        }
        self.write_all_direct_or_buffered(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(self.fixed())
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: fsync references no memory.
        self.with_ring(|r| unsafe { r.run(entry) }).map(drop)
    }

    fn len(&self) -> io::Result<u64> {
        // SAFETY: an all-zero stat is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // The raw syscall: glibc's fstat() is newfstatat(fd, "", AT_EMPTY_PATH),
        // which takes a path and is therefore not in the seccomp allowlist.
        // SAFETY: st is a valid out-pointer; the fd is ours.
        if unsafe { libc::syscall(libc::SYS_fstat, self.raw(), &mut st as *mut libc::stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        u64::try_from(st.st_size).map_err(io::Error::other)
    }

    fn modified_secs(&self) -> Option<i64> {
        // SAFETY: an all-zero stat is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // The raw syscall, as in `len` (seccomp allows fstat, not newfstatat).
        // SAFETY: st is a valid out-pointer; the fd is ours.
        let rc = unsafe { libc::syscall(libc::SYS_fstat, self.raw(), &mut st as *mut libc::stat) };
        (rc == 0).then_some(st.st_mtime)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: ftruncate takes integers only; the fd is ours.
        if unsafe { libc::ftruncate(self.raw(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A buffered read with `RWF_NOWAIT`: the kernel copies what is in the
    /// page cache and answers `EAGAIN` instead of waiting for the device
    /// (a miss still starts readahead, which the slow path then finds), and
    /// io_uring completes the request with `EAGAIN` rather than handing it
    /// to a kernel worker. A direct file never qualifies: its reads always
    /// wait for the device.
    fn read_exact_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.direct {
            return false;
        }
        let mut done = 0;
        while done < buf.len() {
            let Some(at) = offset.checked_add(done as u64) else {
                return false;
            };
            let rest = &mut buf[done..];
            let len = rest.len().min(MAX_OP);
            let entry = opcode::Read::new(self.fixed(), rest.as_mut_ptr(), len as u32)
                .offset(at)
                .rw_flags(libc::RWF_NOWAIT)
                .build();
            // SAFETY: `rest` is exclusively borrowed for the whole call and
            // `run` returns only after the read completed.
            match self.with_ring(|r| unsafe { r.run(entry) }) {
                Ok(n) if n > 0 => done += n as usize,
                _ => return false,
            }
        }
        true
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(self.fixed(), len)
            .offset(offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build();
        // SAFETY: fallocate references no memory.
        match self.with_ring(|r| unsafe { r.run(entry) }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, e))
            }
            Err(e) => Err(e),
        }
    }

    fn direct_fd(&self) -> Option<crate::image::DirectFile> {
        Some(crate::image::DirectFile {
            fd: self.raw(),
            o_direct: self.direct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(len: usize, mode: CacheMode) -> (tempfile::NamedTempFile, UringFile) {
        let t = tempfile::NamedTempFile::new().unwrap();
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        FileExt::write_all_at(t.as_file(), &pattern, 0).unwrap();
        let fd = OwnedFd::from(t.reopen().unwrap());
        (t, UringFile::new(fd, mode).unwrap())
    }

    fn pattern_at(off: usize, len: usize) -> Vec<u8> {
        (off..off + len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn uring_file_round_trips_aligned_and_unaligned_io_in_both_modes() {
        for mode in [CacheMode::Auto, CacheMode::Buffered] {
            let (t, f) = file_with(64 * 1024, mode);
            if mode == CacheMode::Buffered {
                assert!(!f.is_direct());
            }
            let mut buf = AlignedBuf::zeroed(4096);
            f.read_exact_at(&mut buf, 8192).unwrap();
            assert_eq!(&buf[..], &pattern_at(8192, 4096)[..]);
            let mut odd = vec![0u8; 777];
            f.read_exact_at(&mut odd, 1001).unwrap();
            assert_eq!(odd, pattern_at(1001, 777));
            f.write_all_at(b"hello", 513).unwrap();
            f.write_all_at(&[9u8; 4096], 4096).unwrap();
            f.sync_data().unwrap();
            let mut check = vec![0u8; 9000];
            FileExt::read_exact_at(t.as_file(), &mut check, 0).unwrap();
            assert_eq!(&check[513..518], b"hello");
            assert_eq!(&check[512..513], &pattern_at(512, 1)[..]);
            assert_eq!(&check[518..1024], &pattern_at(518, 506)[..]);
            assert!(check[4096..8192].iter().all(|&b| b == 9));
            assert_eq!(f.len().unwrap(), 64 * 1024, "{mode:?}");
        }
    }

    #[test]
    fn uring_file_is_direct_on_a_sector_multiple_file_on_disk() {
        use tapjail_testsupport::{dir_supports_o_direct, fd_flags, require};
        let me = std::process::id();
        let (_t2, g) = file_with(8191, CacheMode::Auto);
        assert!(!g.is_direct(), "odd-length files stay buffered");
        assert_eq!(fd_flags(me, g.raw()).unwrap() & libc::O_DIRECT, 0);
        if !require(
            dir_supports_o_direct(&std::env::temp_dir()),
            "O_DIRECT in the temp dir (set TMPDIR to a filesystem that has it)",
        ) {
            return;
        }
        // Direct as the file says, and as the kernel holds the fd.
        let (_t, f) = file_with(8192, CacheMode::Auto);
        assert!(f.is_direct(), "a sector-multiple file on disk goes direct");
        assert_ne!(
            fd_flags(me, f.raw()).unwrap() & libc::O_DIRECT,
            0,
            "O_DIRECT set on the open file"
        );
        let (_t3, b) = file_with(8192, CacheMode::Buffered);
        assert_eq!(fd_flags(me, b.raw()).unwrap() & libc::O_DIRECT, 0);
    }

    #[test]
    fn uring_file_read_past_end_is_unexpected_eof() {
        let (_t, f) = file_with(4096, CacheMode::Auto);
        let mut buf = AlignedBuf::zeroed(4096);
        let e = f.read_exact_at(&mut buf, 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut small = [0u8; 10];
        let e = f.read_exact_at(&mut small, 4090).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn uring_file_unaligned_write_does_not_grow_the_file_beyond_its_end() {
        let (_t, f) = file_with(4096, CacheMode::Auto);
        f.write_all_at(b"tail", 4096).unwrap();
        assert_eq!(f.len().unwrap(), 4100);
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"tail");
    }

    #[test]
    fn uring_file_punch_hole_reads_back_zero_and_set_len_truncates() {
        let (_t, f) = file_with(16384, CacheMode::Auto);
        f.punch_hole(4096, 8192).unwrap();
        let mut buf = AlignedBuf::zeroed(16384);
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(&buf[..4096], &pattern_at(0, 4096)[..]);
        f.set_len(4096).unwrap();
        assert_eq!(f.len().unwrap(), 4096);
    }

    #[test]
    fn uring_file_serves_concurrent_requests_from_many_threads() {
        let (_t, f) = file_with(1 << 20, CacheMode::Auto);
        let f = std::sync::Arc::new(f);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for j in 0..50u64 {
                        let off = (i * 50 + j) % 256 * 4096;
                        let mut b = AlignedBuf::zeroed(4096);
                        f.read_exact_at(&mut b, off).unwrap();
                        assert_eq!(&b[..], &pattern_at(off as usize, 4096)[..]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn uring_file_gives_each_concurrent_request_its_own_ring() {
        let (_t, f) = file_with(8192, CacheMode::Buffered);
        f.with_ring(|_held| {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, 0) // needs a second ring meanwhile
        })
        .unwrap();
    }

    #[test]
    fn files_sharing_the_ring_pool_each_read_their_own_data_across_slot_reuse() {
        let (_a, a) = file_with(8192, CacheMode::Buffered);
        for round in 0..4u8 {
            // A fresh file takes a slot a closed one may have had; every
            // ring must serve the new file, not what the slot held before.
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("b");
            std::fs::write(&p, vec![round.wrapping_add(0xa0); 4096]).unwrap();
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap()
                .into();
            let b = UringFile::new(fd, CacheMode::Buffered).unwrap();
            let mut x = AlignedBuf::zeroed(4096);
            let mut y = AlignedBuf::zeroed(4096);
            a.read_exact_at(&mut x, 4096).unwrap();
            b.read_exact_at(&mut y, 0).unwrap();
            assert_eq!(&x[..], &pattern_at(4096, 4096)[..]);
            assert!(
                y.iter().all(|&v| v == round.wrapping_add(0xa0)),
                "round {round}"
            );
        }
    }
}
