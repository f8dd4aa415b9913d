//! blktap's `tdbatmap` extension: a bitmap with one bit per block, set when
//! the block is fully written, so that readers can skip its sector bitmap.
//!
//! The batmap header sits in the sector right after the (padded) BAT. qemu
//! does not know about it and allocates new blocks right after the BAT, so
//! an image written by qemu may have data where the batmap was; such a
//! batmap is detected (overlap with a block) and ignored.

use super::endian::{be32, be64, put32, put64};
use crate::ImageError;

pub const COOKIE: &[u8; 8] = b"tdbatmap";
pub const HEADER_BYTES: usize = 512;
pub const VERSION_1_1: u32 = 0x0001_0001;
pub const CURRENT_VERSION: u32 = 0x0001_0002;
/// Largest batmap we read (one bit per block; 2^23 blocks).
pub const MAX_BATMAP_BYTES: u64 = (super::MAX_BAT_ENTRIES / 8) + 512;

const OFF_OFFSET: usize = 8;
const OFF_SIZE: usize = 16;
const OFF_VERSION: usize = 20;
const OFF_CHECKSUM: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Byte offset of the map.
    pub offset: u64,
    /// Size of the map in sectors.
    pub size_sectors: u32,
    pub version: u32,
    pub checksum: u32,
}

impl BatmapHeader {
    /// Parse the header sector; `Err` says why it is not a batmap header.
    pub fn parse(b: &[u8]) -> Result<BatmapHeader, String> {
        if b.len() < 28 || &b[..8] != COOKIE {
            return Err("no tdbatmap cookie".into());
        }
        let h = BatmapHeader {
            offset: be64(b, OFF_OFFSET),
            size_sectors: be32(b, OFF_SIZE),
            version: be32(b, OFF_VERSION),
            checksum: be32(b, OFF_CHECKSUM),
        };
        if h.version > CURRENT_VERSION {
            return Err(format!("unknown batmap version {:#010x}", h.version));
        }
        Ok(h)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..8].copy_from_slice(COOKIE);
        put64(&mut b, OFF_OFFSET, self.offset);
        put32(&mut b, OFF_SIZE, self.size_sectors);
        put32(&mut b, OFF_VERSION, self.version);
        put32(&mut b, OFF_CHECKSUM, self.checksum);
        b
    }

    pub fn map_bytes(&self) -> u64 {
        u64::from(self.size_sectors) * 512
    }
}

/// How many bytes of map the checksum covers, exactly as blktap computes
/// it: `current_size >> 24` bytes (2 MiB blocks, 8 per byte), rounded up to
/// a sector, at least one sector.
pub fn checksum_len(current_size: u64) -> u64 {
    (current_size >> 24).div_ceil(512).max(1) * 512
}

/// blktap's batmap checksum over the first [`checksum_len`] bytes; version
/// 1.1 summed signed chars.
pub fn checksum(map: &[u8], version: u32) -> u32 {
    let sum = map.iter().fold(0u32, |acc, &b| {
        let v = if version == VERSION_1_1 {
            // Sign-extend as C's `(uint32_t)(char)` did on x86.
            i32::from(b as i8) as u32
        } else {
            u32::from(b)
        };
        acc.wrapping_add(v)
    });
    !sum
}

/// Sectors of map a new image with `entries` BAT entries and
/// `current_size` bytes needs (enough for every block and for blktap's
/// checksum range).
pub fn map_sectors(entries: u32, current_size: u64) -> Result<u32, ImageError> {
    let for_bits = u64::from(entries).div_ceil(8).div_ceil(512).max(1);
    let for_sum = checksum_len(current_size) / 512;
    u32::try_from(for_bits.max(for_sum))
        .map_err(|_| ImageError::InvalidArgument("batmap too large".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batmap_header_roundtrips() {
        let h = BatmapHeader {
            offset: 4096,
            size_sectors: 2,
            version: CURRENT_VERSION,
            checksum: 0x1234,
        };
        assert_eq!(BatmapHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn batmap_header_without_cookie_is_not_one() {
        assert!(BatmapHeader::parse(&[0xff; 512]).is_err());
        let mut b = BatmapHeader {
            offset: 0,
            size_sectors: 1,
            version: CURRENT_VERSION + 1,
            checksum: 0,
        }
        .to_bytes();
        assert!(BatmapHeader::parse(&b).is_err());
        b[0] = 0;
        assert!(BatmapHeader::parse(&b).is_err());
    }

    #[test]
    fn batmap_checksum_matches_blktap_formula() {
        assert_eq!(checksum_len(100 << 20), 512);
        assert_eq!(checksum_len(0), 512);
        assert_eq!(checksum_len(8193u64 << 24), 17 * 512);
        let map = [0x80u8, 0, 0];
        assert_eq!(checksum(&map, CURRENT_VERSION), !0x80u32);
        assert_eq!(checksum(&map, VERSION_1_1), !(0xffff_ff80u32));
    }
}
