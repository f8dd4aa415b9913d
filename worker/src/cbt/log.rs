//! blktap's CBT log file format (`include/cbt-util.h`), the one on-disk
//! format every tracked bitmap uses, so that XAPI's `cbt-util` reads ours.
//!
//! A 48-byte header in the host's byte order (blktap `fwrite`s the C struct
//! on x86, so little-endian here): parent UUID (16), child UUID (16),
//! `int consistent` (4), 4 bytes of padding, `uint64_t size` (the disk size
//! in bytes). Then `ceil(ceil(size / 64 KiB) / 8)` bytes of bitmap: bit `n`
//! (64 KiB block `n`) is bit `n % 8` of byte `n / 8` (tapdisk sets bits in
//! `unsigned long` words, which is the same thing on a little-endian host).
//! The file comes from a tenant (or from XAPI): every field is checked.

/// blktap's `CBT_BLOCK_SIZE`: one bit per 64 KiB of the disk.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// `sizeof(struct cbt_log_metadata)` on x86-64.
pub const HEADER_LEN: usize = 48;

/// Largest disk a log may describe (64 TiB: a 128 MiB bitmap held in
/// memory). A bigger `size` in a file is refused, not allocated.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

const CONSISTENT_AT: usize = 32;
const SIZE_AT: usize = 40;

/// Why a log file's bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("CBT log is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error(
        "CBT log says the disk is {0} bytes, more than the {MAX_DISK_SIZE} this worker tracks"
    )]
    TooBig(u64),
    #[error("CBT log holds {have} bitmap bytes but its size field ({size} bytes) needs {need}")]
    ShortBitmap { size: u64, need: u64, have: u64 },
    #[error(
        "CBT log covers a {log} byte disk, smaller than this {disk} byte disk; \
         grow it first (cbt-util set -s)"
    )]
    TooSmall { log: u64, disk: u64 },
    #[error("CBT log consistent flag is {0}, neither 0 nor 1")]
    BadFlag(i32),
}

/// The metadata header (`struct cbt_log_metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub parent: [u8; 16],
    pub child: [u8; 16],
    /// XAPI's flag: 1 when the log is known to cover every write. SM sets it
    /// (`cbt-util set -f`); tapdisk never does, nor do we for its logs.
    pub consistent: bool,
    /// The disk size in bytes the bitmap covers.
    pub size: u64,
}

impl Header {
    pub fn new(size: u64) -> Header {
        Header {
            parent: [0; 16],
            child: [0; 16],
            consistent: true,
            size,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..16].copy_from_slice(&self.parent);
        b[16..32].copy_from_slice(&self.child);
        b[CONSISTENT_AT..CONSISTENT_AT + 4]
            .copy_from_slice(&i32::from(self.consistent).to_le_bytes());
        b[SIZE_AT..SIZE_AT + 8].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    pub fn parse(bytes: &[u8]) -> Result<Header, LogError> {
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(LogError::ShortHeader(bytes.len()))?;
        let mut parent = [0; 16];
        let mut child = [0; 16];
        parent.copy_from_slice(&b[..16]);
        child.copy_from_slice(&b[16..32]);
        let mut flag = [0; 4];
        flag.copy_from_slice(&b[CONSISTENT_AT..CONSISTENT_AT + 4]);
        let consistent = match i32::from_le_bytes(flag) {
            0 => false,
            1 => true,
            other => return Err(LogError::BadFlag(other)),
        };
        let mut size = [0; 8];
        size.copy_from_slice(&b[SIZE_AT..SIZE_AT + 8]);
        let size = u64::from_le_bytes(size);
        if size > MAX_DISK_SIZE {
            return Err(LogError::TooBig(size));
        }
        Ok(Header {
            parent,
            child,
            consistent,
            size,
        })
    }
}

/// 64 KiB blocks of a `size`-byte disk.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// blktap's `bitmap_size()`: bitmap bytes for a `size`-byte disk.
pub fn bitmap_len(size: u64) -> u64 {
    blocks(size).div_ceil(8)
}

/// A whole log file (header, then bitmap) for a `size`-byte disk, all clean.
pub fn fresh(size: u64) -> Vec<u8> {
    let mut v = Header::new(size).encode().to_vec();
    v.resize(
        HEADER_LEN + usize::try_from(bitmap_len(size)).unwrap_or(0),
        0,
    );
    v
}

/// Parse a log file for a disk of `disk_size` bytes (at least its header
/// and the bitmap bytes that cover the disk; the rest need not be read):
/// its header and those bitmap bytes. A log made for a larger disk is
/// accepted, as tapdisk does; the bytes past the disk are left as they are.
pub fn parse(file: &[u8], disk_size: u64) -> Result<(Header, &[u8]), LogError> {
    let header = Header::parse(file)?;
    if header.size < disk_size {
        return Err(LogError::TooSmall {
            log: header.size,
            disk: disk_size,
        });
    }
    let need = bitmap_len(disk_size);
    let have = u64::try_from(file.len() - HEADER_LEN).unwrap_or(u64::MAX);
    if have < need {
        return Err(LogError::ShortBitmap {
            size: header.size,
            need,
            have,
        });
    }
    let used = usize::try_from(need).map_err(|_| LogError::TooBig(disk_size))?;
    Ok((header, &file[HEADER_LEN..HEADER_LEN + used]))
}

/// Whether block `n` is marked in `bitmap` (blktap's bit order).
pub fn test(bitmap: &[u8], n: u64) -> bool {
    usize::try_from(n / 8)
        .ok()
        .and_then(|i| bitmap.get(i))
        .is_some_and(|b| b & (1 << (n % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_matches_the_c_layout() {
        let h = Header {
            parent: [1; 16],
            child: [2; 16],
            consistent: true,
            size: 0x1234_5678_9a00,
        };
        let b = h.encode();
        assert_eq!(&b[32..36], &[1, 0, 0, 0]);
        assert_eq!(&b[36..40], &[0, 0, 0, 0], "padding before the u64");
        assert_eq!(&b[40..48], &[0, 0x9a, 0x78, 0x56, 0x34, 0x12, 0, 0]);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn bitmap_len_is_blktaps_rounding() {
        assert_eq!(bitmap_len(1), 1);
        assert_eq!(bitmap_len(BLOCK_SIZE * 8), 1);
        assert_eq!(bitmap_len(BLOCK_SIZE * 8 + 1), 2);
        assert_eq!(bitmap_len(1 << 30), 2048);
    }

    #[test]
    fn hostile_headers_are_refused() {
        assert_eq!(Header::parse(&[0; 47]), Err(LogError::ShortHeader(47)));
        let mut b = Header::new(1 << 20).encode();
        b[32] = 7;
        assert_eq!(Header::parse(&b), Err(LogError::BadFlag(7)));
        let b = Header::new(u64::MAX).encode();
        assert_eq!(Header::parse(&b), Err(LogError::TooBig(u64::MAX)));
        let mut f = fresh(1 << 30);
        f.truncate(HEADER_LEN + 100);
        assert!(matches!(
            parse(&f, 1 << 30),
            Err(LogError::ShortBitmap { .. })
        ));
        let f = fresh(1 << 20);
        assert!(matches!(parse(&f, 2 << 20), Err(LogError::TooSmall { .. })));
    }

    #[test]
    fn larger_log_is_accepted_and_cut_to_the_disk() {
        let f = fresh(4 << 20);
        let (h, bm) = parse(&f, 1 << 20).unwrap();
        assert_eq!(h.size, 4 << 20);
        assert_eq!(bm.len(), 2);
    }
}
