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
/// First byte tapjail does not own: blktap's `marker` (28), then its
/// `keyhash` (cookie at 29, 32-byte nonce, 32-byte SHA-256 hash) and 418
/// reserved bytes. They are carried through every rewrite unchanged.
pub const OFF_REST: usize = 28;
pub const REST_BYTES: usize = HEADER_BYTES - OFF_REST;
/// `keyhash.cookie`, 1 when tapdisk's crypto keyhash is set (the image's
/// data is encrypted).
const REST_KEYHASH_COOKIE: usize = 29 - OFF_REST;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Byte offset of the map.
    pub offset: u64,
    /// Size of the map in sectors.
    pub size_sectors: u32,
    pub version: u32,
    pub checksum: u32,
    /// Bytes 28..512 as read (marker, keyhash, reserved): not ours.
    pub rest: [u8; REST_BYTES],
}

impl BatmapHeader {
    /// Parse the header sector; `Err` says why it is not a batmap header.
    pub fn parse(b: &[u8]) -> Result<BatmapHeader, String> {
        if b.len() < 28 || &b[..8] != COOKIE {
            return Err("no tdbatmap cookie".into());
        }
        let mut rest = [0u8; REST_BYTES];
        let tail = &b[OFF_REST..b.len().min(HEADER_BYTES)];
        rest[..tail.len()].copy_from_slice(tail);
        let h = BatmapHeader {
            offset: be64(b, OFF_OFFSET),
            size_sectors: be32(b, OFF_SIZE),
            version: be32(b, OFF_VERSION),
            checksum: be32(b, OFF_CHECKSUM),
            rest,
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
        b[OFF_REST..].copy_from_slice(&self.rest);
        b
    }

    /// A header for a new map: marker, keyhash and reserved bytes zero.
    pub fn new(offset: u64, size_sectors: u32, version: u32, checksum: u32) -> BatmapHeader {
        BatmapHeader {
            offset,
            size_sectors,
            version,
            checksum,
            rest: [0; REST_BYTES],
        }
    }

    /// blktap's generic `marker` byte (`vhd-util set -f marker`).
    pub fn marker(&self) -> u8 {
        self.rest[0]
    }

    /// Whether blktap's keyhash is set: tapdisk encrypts this image's data
    /// with a key whose hash this is. tapjail has no crypto, so it must
    /// not write plaintext into such an image.
    pub fn keyhash_set(&self) -> bool {
        self.rest[REST_KEYHASH_COOKIE] != 0
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
        let h = BatmapHeader::new(4096, 2, CURRENT_VERSION, 0x1234);
        assert_eq!(BatmapHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn batmap_header_keeps_marker_keyhash_and_reserved_bytes() {
        let mut b = BatmapHeader::new(4096, 2, CURRENT_VERSION, 0x1234).to_bytes();
        for (i, x) in b[OFF_REST..].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(7).wrapping_add(3);
        }
        b[28] = 1;
        b[29] = 0;
        let mut h = BatmapHeader::parse(&b).unwrap();
        assert_eq!(h.marker(), 1);
        assert!(!h.keyhash_set());
        h.checksum = 0x5678;
        let out = h.to_bytes();
        assert_eq!(&out[OFF_REST..], &b[OFF_REST..]);
        assert_eq!(&out[24..28], &0x5678u32.to_be_bytes());
        b[29] = 1;
        assert!(BatmapHeader::parse(&b).unwrap().keyhash_set());
    }

    #[test]
    fn batmap_header_without_cookie_is_not_one() {
        assert!(BatmapHeader::parse(&[0xff; 512]).is_err());
        let mut b = BatmapHeader::new(0, 1, CURRENT_VERSION + 1, 0).to_bytes();
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
