//! The filesystem the kernel sees: a root directory holding one regular
//! file, the disk. Maps each parsed request to a [`Disk`] call and encodes
//! the reply; knows nothing about threads or the device fd, so unit tests
//! drive it with hand-built messages.
//!
//! Node ids are fixed (root 1, disk 2) and no per-open state is kept, so a
//! fresh worker on a recovered connection can answer requests that refer to
//! lookups and opens its dead predecessor did.

use super::abi::{self, Attr, Writer};
use super::request::{FallocateIn, InitIn, Op, ReadIn, Request, SetattrIn, MAX_READ, MAX_WRITE};
use crate::disk::{Disk, IoKind};
use std::sync::Arc;

/// Who waits for a request's throttle tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Take them and sleep here until the request's slot.
    Admit,
    /// The caller took them and waited already (the FUSE lanes).
    Taken,
}

impl Pace {
    fn io<T>(
        self,
        disk: &Disk,
        kind: IoKind,
        bytes: u64,
        f: impl FnOnce(&dyn crate::image::Image) -> Result<T, crate::image::ImageError>,
    ) -> Result<T, crate::disk::DiskError> {
        match self {
            Pace::Admit => disk.io(kind, bytes, f),
            Pace::Taken => disk.io_taken(kind, bytes, f),
        }
    }
}

/// Node id of the disk file.
pub const FILE_ID: u64 = 2;

/// How long the kernel may cache names and attributes: nothing changes
/// behind its back (the size is fixed for the disk's life).
const CACHE_SECS: u64 = 24 * 3600;

/// Background requests the kernel may have outstanding. Loop's direct I/O
/// arrives as async (background) FUSE requests, so this bounds the queue
/// depth the device reaches; it must exceed fio's depth 32 with room for
/// several devices' worth of readahead.
const MAX_BACKGROUND: u16 = 128;
const CONGESTION_THRESHOLD: u16 = 96;

/// Largest reply payload besides READ data (`fuse_entry_out`).
const SMALL_REPLY: usize = abi::ENTRY_OUT_LEN;

/// Flags we ask for at INIT when the kernel offers them.
/// - ASYNC_DIO: loop's direct I/O becomes many async requests in flight
///   instead of one synchronous request at a time.
/// - BIG_WRITES + MAX_PAGES: 256 KiB requests instead of 4 KiB / 128 KiB.
/// - ASYNC_READ: buffered reads (if loop falls back to them) in parallel.
/// - INIT_EXT: needed for the kernel to read `flags2` at all.
/// - HAS_RESEND: echoed to say we understand resent requests' unique bit.
///
/// Not asked: PARALLEL_DIROPS (one file, nothing to parallelise),
/// WRITEBACK_CACHE (data must reach the image, not sit in a second page
/// cache), PASSTHROUGH (the kernel would bypass us and the image format),
/// OVER_IO_URING (see the module doc of `fuse`).
const WANTED_FLAGS: u64 = abi::FUSE_ASYNC_READ
    | abi::FUSE_BIG_WRITES
    | abi::FUSE_ASYNC_DIO
    | abi::FUSE_MAX_PAGES
    | abi::FUSE_INIT_EXT
    | abi::FUSE_HAS_RESEND;

/// An encoded reply payload (without the out header).
#[derive(Debug, Clone, Copy)]
pub struct Payload {
    buf: [u8; SMALL_REPLY],
    len: usize,
}

impl Payload {
    fn new(len: usize) -> Self {
        debug_assert!(len <= SMALL_REPLY);
        Payload {
            buf: [0; SMALL_REPLY],
            len: len.min(SMALL_REPLY),
        }
    }
    fn writer(&mut self) -> Writer<'_> {
        Writer::new(&mut self.buf[..self.len])
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What to send back for one request.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Success with a (possibly empty) payload.
    Ok(Payload),
    /// Failure with a positive errno.
    Err(i32),
    /// A READ: the caller runs [`OneFileFs::read`] into its data buffer
    /// (once the request buffer is no longer borrowed).
    Read(ReadIn),
    /// No reply at all (FORGET, INTERRUPT, ...).
    None,
    /// INIT answered with this payload; the connection is now usable.
    Initialized(Payload),
    /// INIT refused (protocol too old); the connection cannot be served.
    InitRefused(i32),
}

/// The served filesystem.
#[derive(Debug)]
pub struct OneFileFs {
    disk: Arc<Disk>,
    name: Vec<u8>,
}

impl OneFileFs {
    pub fn new(disk: Arc<Disk>, file_name: &str) -> Self {
        OneFileFs {
            disk,
            name: file_name.as_bytes().to_vec(),
        }
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Answer one request. Image I/O for WRITE, FSYNC and FALLOCATE happens
    /// here; READ is deferred to [`OneFileFs::read`].
    pub fn handle(&self, req: &Request<'_>) -> Outcome {
        let node = req.header.nodeid;
        match &req.op {
            Op::Init(init) => match negotiate(init) {
                Ok(p) => Outcome::Initialized(p),
                Err(e) => Outcome::InitRefused(e),
            },
            Op::Lookup { name } => self.lookup(node, name),
            Op::Getattr => match self.attr(node) {
                Some(a) => Outcome::Ok(attr_out(&a)),
                None => Outcome::Err(libc::ENOENT),
            },
            Op::Setattr(s) => self.setattr(node, s),
            Op::Open { flags } => self.open(node, *flags),
            Op::Opendir => match node {
                abi::ROOT_ID => Outcome::Ok(open_out(0)),
                FILE_ID => Outcome::Err(libc::ENOTDIR),
                _ => Outcome::Err(libc::ENOENT),
            },
            Op::Read(r) => match node {
                FILE_ID => Outcome::Read(*r),
                abi::ROOT_ID => Outcome::Err(libc::EISDIR),
                _ => Outcome::Err(libc::ENOENT),
            },
            Op::Write { offset, data } => self.write(node, *offset, data),
            Op::Statfs => Outcome::Ok(self.statfs()),
            Op::Release | Op::Releasedir | Op::Destroy => Outcome::Ok(Payload::new(0)),
            Op::Fsync | Op::Flush => self.flush(node),
            Op::Fallocate(f) => self.fallocate(node, f),
            Op::NoReply => Outcome::None,
            Op::Other(_) => Outcome::Err(libc::ENOSYS),
        }
    }

    fn attr(&self, node: u64) -> Option<Attr> {
        match node {
            abi::ROOT_ID => Some(Attr {
                ino: abi::ROOT_ID,
                size: 0,
                blocks: 0,
                mode: libc::S_IFDIR | 0o500,
                nlink: 2,
                uid: 0,
                gid: 0,
                blksize: 4096,
            }),
            FILE_ID => {
                let size = self.disk.size();
                let perm = if self.disk.read_only() { 0o400 } else { 0o600 };
                Some(Attr {
                    ino: FILE_ID,
                    size,
                    blocks: size.div_ceil(512),
                    mode: libc::S_IFREG | perm,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    blksize: 4096,
                })
            }
            _ => None,
        }
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Outcome {
        if parent != abi::ROOT_ID {
            return Outcome::Err(libc::ENOTDIR);
        }
        if name != self.name.as_slice() {
            return Outcome::Err(libc::ENOENT);
        }
        let Some(attr) = self.attr(FILE_ID) else {
            return Outcome::Err(libc::ENOENT);
        };
        let mut p = Payload::new(abi::ENTRY_OUT_LEN);
        let mut w = p.writer();
        w.u64(0, FILE_ID)
            .u64(8, 1) // generation
            .u64(16, CACHE_SECS)
            .u64(24, CACHE_SECS);
        attr.write(&mut w, 40);
        Outcome::Ok(p)
    }

    fn setattr(&self, node: u64, s: &SetattrIn) -> Outcome {
        let Some(attr) = self.attr(node) else {
            return Outcome::Err(libc::ENOENT);
        };
        // Ownership and mode are fixed; the size is the disk's. Time
        // updates are accepted and forgotten (we report no times).
        if s.valid & (abi::FATTR_MODE | abi::FATTR_UID | abi::FATTR_GID) != 0 {
            return Outcome::Err(libc::EPERM);
        }
        if s.valid & abi::FATTR_SIZE != 0 && (node != FILE_ID || s.size != attr.size) {
            return Outcome::Err(libc::EPERM);
        }
        Outcome::Ok(attr_out(&attr))
    }

    fn open(&self, node: u64, flags: u32) -> Outcome {
        match node {
            FILE_ID => {}
            abi::ROOT_ID => return Outcome::Err(libc::EISDIR),
            _ => return Outcome::Err(libc::ENOENT),
        }
        let accmode = flags & (libc::O_ACCMODE as u32);
        if accmode != libc::O_RDONLY as u32 && self.disk.read_only() {
            return Outcome::Err(libc::EROFS);
        }
        // DIRECT_IO: no page cache between loop and us, so nothing is lost
        // or stale when a worker dies and another takes over.
        // PARALLEL_DIRECT_WRITES: without it the kernel serialises writes
        // on the inode lock. NOFLUSH: close(2) of the broker's fd must not
        // wait for us (a stuck worker could otherwise hang the broker);
        // durability comes from FSYNC, which loop sends for every flush.
        Outcome::Ok(open_out(
            abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES | abi::FOPEN_NOFLUSH,
        ))
    }

    /// Serve a READ into `buf` (at least [`MAX_READ`] bytes); returns the
    /// number of bytes to send or a positive errno. Reads at or past the
    /// end return short, as a regular file does.
    pub fn read(&self, r: &ReadIn, buf: &mut [u8]) -> Result<usize, i32> {
        self.read_paced(r, buf, Pace::Admit)
    }

    /// Bytes a READ will transfer (what its throttle tokens are for).
    pub fn read_len(&self, r: &ReadIn) -> u64 {
        let size = self.disk.size();
        u64::from(r.size).min(size.saturating_sub(r.offset))
    }

    /// [`OneFileFs::read`], waiting for throttle tokens as `pace` says.
    pub fn read_paced(&self, r: &ReadIn, buf: &mut [u8], pace: Pace) -> Result<usize, i32> {
        let size = self.disk.size();
        if r.offset >= size {
            return Ok(0);
        }
        let want = u64::from(r.size).min(size - r.offset);
        // want <= r.size <= MAX_READ, which fits usize.
        let len = usize::try_from(want).map_err(|_| libc::EINVAL)?;
        let dst = buf.get_mut(..len).ok_or(libc::EINVAL)?;
        debug_assert!(len <= MAX_READ);
        pace.io(&self.disk, IoKind::Read, want, |img| {
            img.read_at(dst, r.offset)
        })
        .map_err(|e| e.errno())?;
        Ok(len)
    }

    /// Serve a WRITE of `data` (at most [`MAX_WRITE`] bytes) at `offset`.
    pub fn write(&self, node: u64, offset: u64, data: &[u8]) -> Outcome {
        self.write_paced(node, offset, data, Pace::Admit)
    }

    /// Whether a WRITE of `len` bytes at `offset` would be refused (a
    /// positive errno), before any tokens are taken for it.
    pub fn write_refusal(&self, node: u64, offset: u64, len: u64) -> Option<i32> {
        if node != FILE_ID {
            return Some(if node == abi::ROOT_ID {
                libc::EISDIR
            } else {
                libc::ENOENT
            });
        }
        if self.disk.read_only() {
            return Some(libc::EROFS);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() => None,
            _ => Some(libc::ENOSPC),
        }
    }

    /// [`OneFileFs::write`], waiting for throttle tokens as `pace` says.
    pub fn write_paced(&self, node: u64, offset: u64, data: &[u8], pace: Pace) -> Outcome {
        if node != FILE_ID {
            return Outcome::Err(if node == abi::ROOT_ID {
                libc::EISDIR
            } else {
                libc::ENOENT
            });
        }
        if self.disk.read_only() {
            return Outcome::Err(libc::EROFS);
        }
        let len = data.len() as u64; // <= MAX_WRITE
        debug_assert!(data.len() <= MAX_WRITE);
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() => {}
            // The file cannot grow: a disk has a fixed size.
            _ => return Outcome::Err(libc::ENOSPC),
        }
        match pace.io(&self.disk, IoKind::Write, len, |img| {
            img.write_at(data, offset)
        }) {
            Ok(()) => {
                let mut p = Payload::new(abi::WRITE_OUT_LEN);
                // data.len() <= MAX_WRITE < u32::MAX.
                p.writer().u32(0, data.len() as u32);
                Outcome::Ok(p)
            }
            Err(e) => Outcome::Err(e.errno()),
        }
    }

    fn flush(&self, node: u64) -> Outcome {
        if node != FILE_ID {
            return Outcome::Ok(Payload::new(0));
        }
        match self.disk.io(IoKind::Flush, 0, |img| img.flush()) {
            Ok(()) => Outcome::Ok(Payload::new(0)),
            Err(e) => Outcome::Err(e.errno()),
        }
    }

    /// Loop turns a block discard and a write-zeroes without NOUNMAP into
    /// PUNCH_HOLE|KEEP_SIZE, and write-zeroes with NOUNMAP into ZERO_RANGE.
    /// Since a punched file range must read back as zeroes, and we cannot
    /// tell which of the two block requests this was, a punch is an image
    /// `write_zeroes` that may deallocate, not a bare discard.
    fn fallocate(&self, node: u64, f: &FallocateIn) -> Outcome {
        if node != FILE_ID {
            return Outcome::Err(libc::ENODEV);
        }
        if self.disk.read_only() {
            return Outcome::Err(libc::EROFS);
        }
        let size = self.disk.size();
        let Some(end) = f.offset.checked_add(f.length) else {
            return Outcome::Err(libc::EFBIG);
        };
        let keep = f.mode & abi::FALLOC_FL_KEEP_SIZE != 0;
        let op = f.mode & !abi::FALLOC_FL_KEEP_SIZE;
        let may_unmap = match op {
            abi::FALLOC_FL_PUNCH_HOLE if keep => true,
            abi::FALLOC_FL_ZERO_RANGE => false,
            // Plain preallocation cannot be promised by a thin image, and
            // nothing else (collapse, insert, unshare) fits a disk.
            _ => return Outcome::Err(libc::EOPNOTSUPP),
        };
        if end > size && !keep {
            return Outcome::Err(libc::ENOSPC);
        }
        let end = end.min(size);
        if f.offset >= end {
            return Outcome::Ok(Payload::new(0));
        }
        let len = end - f.offset;
        // A punched hole is how loop passes on a discard.
        let kind = if may_unmap {
            IoKind::Discard
        } else {
            IoKind::Other
        };
        match self
            .disk
            .io(kind, 0, |img| img.write_zeroes(f.offset, len, may_unmap))
        {
            Ok(()) => Outcome::Ok(Payload::new(0)),
            Err(e) => Outcome::Err(e.errno()),
        }
    }

    fn statfs(&self) -> Payload {
        let mut p = Payload::new(abi::STATFS_OUT_LEN);
        p.writer()
            .u64(0, self.disk.size() / 4096) // blocks
            .u64(24, 1) // files
            .u32(40, 4096) // bsize: loop's discard granularity
            .u32(44, 255) // namelen
            .u32(48, 4096); // frsize
        p
    }
}

fn attr_out(a: &Attr) -> Payload {
    let mut p = Payload::new(abi::ATTR_OUT_LEN);
    let mut w = p.writer();
    w.u64(0, CACHE_SECS);
    a.write(&mut w, 16);
    p
}

fn open_out(open_flags: u32) -> Payload {
    let mut p = Payload::new(abi::OPEN_OUT_LEN);
    p.writer().u64(0, 0).u32(8, open_flags);
    p
}

/// The INIT reply for what the kernel offered, or the errno refusing it.
pub fn negotiate(init: &InitIn) -> Result<Payload, i32> {
    if init.major != abi::KERNEL_VERSION || init.minor < abi::MIN_KERNEL_MINOR {
        return Err(libc::EPROTO);
    }
    let flags = WANTED_FLAGS & init.flags;
    let mut p = Payload::new(abi::INIT_OUT_LEN);
    p.writer()
        .u32(0, abi::KERNEL_VERSION)
        .u32(4, abi::KERNEL_MINOR_VERSION)
        .u32(8, init.max_readahead)
        .u32(12, flags as u32) // low half
        .u16(16, MAX_BACKGROUND)
        .u16(18, CONGESTION_THRESHOLD)
        .u32(20, MAX_WRITE as u32)
        .u32(24, 1) // time_gran
        .u16(28, (MAX_WRITE / 4096) as u16) // max_pages
        .u32(32, (flags >> 32) as u32); // flags2
    Ok(p)
}

/// Whether an INIT from this kernel means FUSE_NOTIFY_RESEND will work.
pub fn kernel_has_resend(init: &InitIn) -> bool {
    init.minor >= abi::RESEND_MINOR && init.flags & abi::FUSE_HAS_RESEND != 0
}

#[cfg(test)]
mod tests {
    use super::super::abi::ReadNe;
    use super::super::request::parse;
    use super::super::request::tests::{msg, read_arg, write_arg};
    use super::*;
    use crate::image::raw::RawImage;

    fn fs_with(len: u64, ro: bool) -> (tempfile::NamedTempFile, OneFileFs) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", ro).unwrap();
        (f, OneFileFs::new(Disk::new(Arc::new(img)), "disk"))
    }

    fn run(fs: &OneFileFs, m: &[u8]) -> Outcome {
        fs.handle(&parse(m).unwrap())
    }

    fn ok(o: Outcome) -> Payload {
        match o {
            Outcome::Ok(p) | Outcome::Initialized(p) => p,
            other => panic!("expected success, got {other:?}"),
        }
    }

    fn init_arg(minor: u32, flags: u64) -> Vec<u8> {
        let mut a = vec![0u8; 64];
        Writer::new(&mut a)
            .u32(0, 7)
            .u32(4, minor)
            .u32(8, 131072)
            .u32(12, flags as u32)
            .u32(16, (flags >> 32) as u32);
        a
    }

    #[test]
    fn init_negotiates_only_offered_flags_and_big_requests() {
        let offered = abi::FUSE_INIT_EXT
            | abi::FUSE_ASYNC_DIO
            | abi::FUSE_MAX_PAGES
            | abi::FUSE_HAS_RESEND
            | abi::FUSE_PARALLEL_DIROPS;
        let (_f, fs) = fs_with(4096, false);
        let p = ok(run(&fs, &msg(abi::INIT, 1, 0, &init_arg(41, offered))));
        let b = p.bytes();
        assert_eq!(b.len(), abi::INIT_OUT_LEN);
        let flags = u64::from(b.u32_at(12).unwrap()) | u64::from(b.u32_at(32).unwrap()) << 32;
        assert_eq!(
            flags,
            abi::FUSE_INIT_EXT | abi::FUSE_ASYNC_DIO | abi::FUSE_MAX_PAGES | abi::FUSE_HAS_RESEND
        );
        assert_eq!(flags & abi::FUSE_PARALLEL_DIROPS, 0);
        assert_eq!(b.u32_at(20), Some(MAX_WRITE as u32));
        assert_eq!(b.u16_at(28), Some((MAX_WRITE / 4096) as u16));
    }

    #[test]
    fn init_from_an_old_kernel_is_refused() {
        let (_f, fs) = fs_with(4096, false);
        assert!(matches!(
            run(&fs, &msg(abi::INIT, 1, 0, &init_arg(26, 0))),
            Outcome::InitRefused(libc::EPROTO)
        ));
    }

    #[test]
    fn resend_support_needs_minor_40_and_the_flag() {
        let with = |minor, flags| InitIn {
            major: 7,
            minor,
            max_readahead: 0,
            flags,
        };
        assert!(kernel_has_resend(&with(41, abi::FUSE_HAS_RESEND)));
        assert!(!kernel_has_resend(&with(39, abi::FUSE_HAS_RESEND)));
        assert!(!kernel_has_resend(&with(41, 0)));
    }

    #[test]
    fn lookup_finds_only_the_disk_file() {
        let (_f, fs) = fs_with(1 << 20, false);
        let p = ok(run(&fs, &msg(abi::LOOKUP, 1, 1, b"disk\0")));
        assert_eq!(p.bytes().u64_at(0), Some(FILE_ID));
        assert_eq!(p.bytes().u64_at(40 + 8), Some(1 << 20));
        assert!(matches!(
            run(&fs, &msg(abi::LOOKUP, 1, 1, b"other\0")),
            Outcome::Err(libc::ENOENT)
        ));
        assert!(matches!(
            run(&fs, &msg(abi::LOOKUP, 1, FILE_ID, b"disk\0")),
            Outcome::Err(libc::ENOTDIR)
        ));
    }

    #[test]
    fn write_then_read_round_trips_through_the_image() {
        let (f, fs) = fs_with(8192, false);
        let p = ok(run(
            &fs,
            &msg(abi::WRITE, 1, FILE_ID, &write_arg(1000, b"abc")),
        ));
        assert_eq!(p.bytes().u32_at(0), Some(3));
        let Outcome::Read(r) = run(&fs, &msg(abi::READ, 2, FILE_ID, &read_arg(999, 5))) else {
            panic!("read not deferred")
        };
        let mut buf = vec![0u8; MAX_READ];
        assert_eq!(fs.read(&r, &mut buf), Ok(5));
        assert_eq!(&buf[..5], b"\0abc\0");
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[1000..1003], b"abc");
    }

    #[test]
    fn read_past_the_end_is_short_and_write_past_the_end_fails() {
        let (_f, fs) = fs_with(4096, false);
        let mut buf = vec![0u8; MAX_READ];
        let r = ReadIn {
            offset: 4000,
            size: 4096,
        };
        assert_eq!(fs.read(&r, &mut buf), Ok(96));
        let r = ReadIn {
            offset: 1 << 40,
            size: 4096,
        };
        assert_eq!(fs.read(&r, &mut buf), Ok(0));
        assert!(matches!(
            run(&fs, &msg(abi::WRITE, 1, FILE_ID, &write_arg(4094, b"abc"))),
            Outcome::Err(libc::ENOSPC)
        ));
        assert!(matches!(
            run(
                &fs,
                &msg(abi::WRITE, 1, FILE_ID, &write_arg(u64::MAX - 1, b"abc"))
            ),
            Outcome::Err(libc::ENOSPC)
        ));
    }

    #[test]
    fn read_only_disk_refuses_writable_open_write_and_punch() {
        let (f, fs) = fs_with(4096, true);
        let mut open = vec![0u8; 8];
        Writer::new(&mut open).u32(0, libc::O_RDWR as u32);
        assert!(matches!(
            run(&fs, &msg(abi::OPEN, 1, FILE_ID, &open)),
            Outcome::Err(libc::EROFS)
        ));
        Writer::new(&mut open).u32(0, libc::O_RDONLY as u32);
        assert!(matches!(
            run(&fs, &msg(abi::OPEN, 1, FILE_ID, &open)),
            Outcome::Ok(_)
        ));
        assert!(matches!(
            run(&fs, &msg(abi::WRITE, 1, FILE_ID, &write_arg(0, b"x"))),
            Outcome::Err(libc::EROFS)
        ));
        let mut fa = vec![0u8; 32];
        Writer::new(&mut fa)
            .u64(16, 4096)
            .u32(24, abi::FALLOC_FL_PUNCH_HOLE | abi::FALLOC_FL_KEEP_SIZE);
        assert!(matches!(
            run(&fs, &msg(abi::FALLOCATE, 1, FILE_ID, &fa)),
            Outcome::Err(libc::EROFS)
        ));
        assert!(std::fs::read(f.path()).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn punch_hole_and_zero_range_read_back_as_zeroes() {
        let (f, fs) = fs_with(3 * 4096, false);
        std::fs::write(f.path(), vec![0xaa; 3 * 4096]).unwrap();
        for (off, mode) in [
            (0u64, abi::FALLOC_FL_PUNCH_HOLE | abi::FALLOC_FL_KEEP_SIZE),
            (8192, abi::FALLOC_FL_ZERO_RANGE | abi::FALLOC_FL_KEEP_SIZE),
        ] {
            let mut fa = vec![0u8; 32];
            Writer::new(&mut fa).u64(8, off).u64(16, 4096).u32(24, mode);
            ok(run(&fs, &msg(abi::FALLOCATE, 1, FILE_ID, &fa)));
        }
        let data = std::fs::read(f.path()).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[4096..8192].iter().all(|&b| b == 0xaa));
        assert!(data[8192..].iter().all(|&b| b == 0));
        // Punch without KEEP_SIZE, or plain preallocation: not for a disk.
        let mut fa = vec![0u8; 32];
        Writer::new(&mut fa)
            .u64(16, 4096)
            .u32(24, abi::FALLOC_FL_PUNCH_HOLE);
        assert!(matches!(
            run(&fs, &msg(abi::FALLOCATE, 1, FILE_ID, &fa)),
            Outcome::Err(libc::EOPNOTSUPP)
        ));
    }

    #[test]
    fn setattr_refuses_resize_and_chmod_but_accepts_times() {
        let (_f, fs) = fs_with(4096, false);
        let mut s = vec![0u8; abi::SETATTR_IN_LEN];
        Writer::new(&mut s).u32(0, abi::FATTR_SIZE).u64(16, 0);
        assert!(matches!(
            run(&fs, &msg(abi::SETATTR, 1, FILE_ID, &s)),
            Outcome::Err(libc::EPERM)
        ));
        Writer::new(&mut s).u32(0, abi::FATTR_MODE);
        assert!(matches!(
            run(&fs, &msg(abi::SETATTR, 1, FILE_ID, &s)),
            Outcome::Err(libc::EPERM)
        ));
        Writer::new(&mut s).u32(0, 1 << 5); // FATTR_MTIME
        let p = ok(run(&fs, &msg(abi::SETATTR, 1, FILE_ID, &s)));
        assert_eq!(p.bytes().u64_at(16 + 8), Some(4096));
    }

    #[test]
    fn unknown_ops_are_enosys_and_forget_gets_no_reply() {
        let (_f, fs) = fs_with(4096, false);
        assert!(matches!(
            run(&fs, &msg(abi::SETATTR + 1000, 1, 1, &[])),
            Outcome::Err(libc::ENOSYS)
        ));
        assert!(matches!(
            run(&fs, &msg(abi::FORGET, 1, FILE_ID, &[0u8; 8])),
            Outcome::None
        ));
        assert!(matches!(
            run(&fs, &msg(abi::INTERRUPT, 3, 0, &[0u8; 8])),
            Outcome::None
        ));
    }

    #[test]
    fn getattr_reports_a_fixed_size_file_and_a_directory() {
        let (_f, fs) = fs_with(1 << 20, false);
        let p = ok(run(&fs, &msg(abi::GETATTR, 1, FILE_ID, &[0u8; 16])));
        assert_eq!(p.bytes().u64_at(16 + 8), Some(1 << 20));
        assert_eq!(p.bytes().u32_at(16 + 60), Some(libc::S_IFREG | 0o600));
        let p = ok(run(&fs, &msg(abi::GETATTR, 1, abi::ROOT_ID, &[0u8; 16])));
        assert_eq!(p.bytes().u32_at(16 + 60), Some(libc::S_IFDIR | 0o500));
        assert!(matches!(
            run(&fs, &msg(abi::GETATTR, 1, 77, &[0u8; 16])),
            Outcome::Err(libc::ENOENT)
        ));
    }
}
