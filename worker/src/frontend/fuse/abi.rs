//! The slice of the FUSE kernel ABI (`include/uapi/linux/fuse.h`, protocol
//! 7.x) this frontend speaks: opcodes, flags and the byte layout of the
//! structures it reads and writes.
//!
//! Layouts are written out by hand as offsets into byte slices instead of
//! `#[repr(C)]` structs cast over the buffer: every field read is a bounds
//! checked copy, so nothing here needs `unsafe`, and a short or hostile
//! message can only produce an error. FUSE messages are in host byte order.

/// Protocol major version; the only one Linux has ever spoken.
pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor we implement (7.40 added `FUSE_NOTIFY_RESEND`).
pub const KERNEL_MINOR_VERSION: u32 = 40;
/// Oldest kernel minor we accept: 7.28 brought `FUSE_MAX_PAGES`, which our
/// 256 KiB requests rely on, and fixed every struct size we use.
pub const MIN_KERNEL_MINOR: u32 = 28;
/// Minor version that introduced `FUSE_NOTIFY_RESEND` (Linux 6.9).
pub const RESEND_MINOR: u32 = 40;

/// Node id of the root directory.
pub const ROOT_ID: u64 = 1;

/// Bit 63 of `unique` marks a request the kernel re-queued after
/// `FUSE_NOTIFY_RESEND`; the reply must echo the value unchanged.
pub const UNIQUE_RESEND: u64 = 1 << 63;

// Opcodes (enum fuse_opcode).
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const NOTIFY_REPLY: u32 = 41;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

// Notification codes (enum fuse_notify_code), sent with unique = 0.
pub const NOTIFY_RESEND: i32 = 7;

// INIT flags (low 32 bits in `flags`, high 32 bits in `flags2`).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_ASYNC_DIO: u64 = 1 << 15;
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_HAS_RESEND: u64 = 1 << 39;
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR `valid` bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;

// fallocate(2) modes the kernel forwards unchanged.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// Sizes of the fixed structures.
pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const INIT_IN_MIN_LEN: usize = 16;
pub const INIT_OUT_LEN: usize = 64;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const WRITE_OUT_LEN: usize = 8;
pub const STATFS_OUT_LEN: usize = 80;
pub const READ_IN_LEN: usize = 40;
pub const WRITE_IN_LEN: usize = 40;
pub const OPEN_IN_LEN: usize = 8;
pub const FSYNC_IN_LEN: usize = 16;
pub const FALLOCATE_IN_LEN: usize = 32;
pub const SETATTR_IN_LEN: usize = 88;

/// Reads fixed-size host-endian integers out of a byte slice, `None` when
/// the slice is too short.
pub trait ReadNe {
    fn u16_at(&self, off: usize) -> Option<u16>;
    fn u32_at(&self, off: usize) -> Option<u32>;
    fn u64_at(&self, off: usize) -> Option<u64>;
}

impl ReadNe for [u8] {
    fn u16_at(&self, off: usize) -> Option<u16> {
        let b = self.get(off..off.checked_add(2)?)?;
        Some(u16::from_ne_bytes(b.try_into().ok()?))
    }
    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.get(off..off.checked_add(4)?)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    }
    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.get(off..off.checked_add(8)?)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }
}

/// Writes host-endian integers into a fixed buffer being built. Offsets are
/// compile-time layout constants, so an out-of-range write is a bug in this
/// module, caught by the unit tests rather than by a panic on input.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        buf.fill(0);
        Writer { buf }
    }
    fn put(&mut self, off: usize, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        } else {
            debug_assert!(false, "FUSE layout write out of range");
        }
    }
    pub fn u16(&mut self, off: usize, v: u16) -> &mut Self {
        self.put(off, &v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.put(off, &v.to_ne_bytes());
        self
    }
    pub fn i32(&mut self, off: usize, v: i32) -> &mut Self {
        self.put(off, &v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.put(off, &v.to_ne_bytes());
        self
    }
}

/// `struct fuse_attr`, the only inode metadata the kernel gets from us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

impl Attr {
    /// Encode at `off` inside `w` (88 bytes).
    pub fn write(&self, w: &mut Writer<'_>, off: usize) {
        w.u64(off, self.ino)
            .u64(off + 8, self.size)
            .u64(off + 16, self.blocks)
            // atime, mtime, ctime and their nsec fields stay 0.
            .u32(off + 60, self.mode)
            .u32(off + 64, self.nlink)
            .u32(off + 68, self.uid)
            .u32(off + 72, self.gid)
            // rdev at 76 stays 0.
            .u32(off + 80, self.blksize);
        // flags at 84 stays 0.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ne_refuses_short_slices() {
        let b = [1u8, 0, 0, 0, 0, 0, 0];
        assert_eq!(b[..].u32_at(0), Some(1));
        assert_eq!(b[..].u32_at(4), None);
        assert_eq!(b[..].u64_at(0), None);
        assert_eq!(b[..].u16_at(usize::MAX), None);
    }

    #[test]
    fn attr_encoding_places_fields_at_kernel_offsets() {
        let mut buf = [0xffu8; ATTR_LEN];
        let a = Attr {
            ino: 2,
            size: 4096,
            blocks: 8,
            mode: 0o100600,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
        };
        a.write(&mut Writer::new(&mut buf), 0);
        assert_eq!(buf[..].u64_at(0), Some(2));
        assert_eq!(buf[..].u64_at(8), Some(4096));
        assert_eq!(buf[..].u32_at(60), Some(0o100600));
        assert_eq!(buf[..].u32_at(80), Some(4096));
        assert_eq!(buf[..].u32_at(84), Some(0));
    }
}
