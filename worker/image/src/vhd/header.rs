//! The 1024-byte dynamic disk header (`cxsparse`) of dynamic and
//! differencing images: where the BAT is, the block size, and the parent.

use super::endian::{be32, be64, checksum, put32, put64};
use super::locator::{LocatorCode, LocatorEntry};
use super::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::ImageError;

pub const HEADER_SIZE: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Number of parent locator slots.
pub const LOCATOR_SLOTS: usize = 8;

const OFF_DATA_OFFSET: usize = 8;
const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_TABLE_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_CHECKSUM: usize = 36;
const OFF_PARENT_UUID: usize = 40;
const OFF_PARENT_TIMESTAMP: usize = 56;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_LEN: usize = 512;
const OFF_LOCATORS: usize = 576;
const LOCATOR_ENTRY_SIZE: usize = 24;

/// A parsed, checksum-verified dynamic disk header. Reserved bytes are
/// kept so that rewriting preserves them.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    raw: [u8; HEADER_SIZE],
    pub locators: [LocatorEntry; LOCATOR_SLOTS],
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("table_offset", &self.table_offset())
            .field("max_table_entries", &self.max_table_entries())
            .field("block_size", &self.block_size())
            .field("parent_name", &self.parent_name())
            .finish()
    }
}

impl Header {
    /// Parse and verify the header fields that do not depend on the rest
    /// of the file (cookie, checksum, version, block size, locator codes).
    pub fn parse(buf: &[u8; HEADER_SIZE]) -> Result<Header, ImageError> {
        let raw = *buf;
        if &raw[..8] != COOKIE {
            return Err(ImageError::corrupt(
                "header.cookie",
                // Not quoted, as for the footer's cookie.
                "expected \"cxsparse\": this is not a VHD dynamic header",
            ));
        }
        let stored = be32(&raw, OFF_CHECKSUM);
        let computed = checksum(&raw, OFF_CHECKSUM);
        if stored != computed {
            return Err(ImageError::corrupt(
                "header.checksum",
                format!("stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let version = be32(&raw, OFF_VERSION);
        if version != HEADER_VERSION {
            return Err(ImageError::corrupt(
                "header.version",
                format!("{version:#010x}, only 0x00010000 is defined"),
            ));
        }
        // The specification says 0xFFFFFFFF; qemu and blktap write all ones.
        let data_offset = be64(&raw, OFF_DATA_OFFSET);
        if data_offset != u64::MAX && data_offset != 0xFFFF_FFFF {
            return Err(ImageError::corrupt(
                "header.data_offset",
                format!("{data_offset:#x}, expected all ones"),
            ));
        }
        let bs = be32(&raw, OFF_BLOCK_SIZE);
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(ImageError::corrupt(
                "header.block_size",
                format!("{bs} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"),
            ));
        }
        let mut locators = [LocatorEntry::default(); LOCATOR_SLOTS];
        for (i, loc) in locators.iter_mut().enumerate() {
            let o = OFF_LOCATORS + i * LOCATOR_ENTRY_SIZE;
            let code = be32(&raw, o);
            *loc = LocatorEntry {
                code: LocatorCode::from_u32(code).ok_or_else(|| {
                    ImageError::corrupt(
                        "header.parent_locator.code",
                        format!("slot {i}: unknown platform code {code:#010x}"),
                    )
                })?,
                data_space: be32(&raw, o + 4),
                data_len: be32(&raw, o + 8),
                data_offset: be64(&raw, o + 16),
            };
        }
        Ok(Header { raw, locators })
    }

    /// A fresh header for a new image whose BAT sits at `table_offset`.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Header {
        let mut raw = [0u8; HEADER_SIZE];
        raw[..8].copy_from_slice(COOKIE);
        put64(&mut raw, OFF_DATA_OFFSET, u64::MAX);
        put64(&mut raw, OFF_TABLE_OFFSET, table_offset);
        put32(&mut raw, OFF_VERSION, HEADER_VERSION);
        put32(&mut raw, OFF_MAX_TABLE_ENTRIES, max_table_entries);
        put32(&mut raw, OFF_BLOCK_SIZE, block_size);
        Header {
            raw,
            locators: [LocatorEntry::default(); LOCATOR_SLOTS],
        }
    }

    /// The header as stored, locators and checksum refreshed.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = self.raw;
        for (i, loc) in self.locators.iter().enumerate() {
            let o = OFF_LOCATORS + i * LOCATOR_ENTRY_SIZE;
            put32(&mut raw, o, loc.code.to_u32());
            put32(&mut raw, o + 4, loc.data_space);
            put32(&mut raw, o + 8, loc.data_len);
            put32(&mut raw, o + 12, 0);
            put64(&mut raw, o + 16, loc.data_offset);
        }
        put32(&mut raw, OFF_CHECKSUM, 0);
        let c = checksum(&raw, OFF_CHECKSUM);
        put32(&mut raw, OFF_CHECKSUM, c);
        raw
    }

    pub fn table_offset(&self) -> u64 {
        be64(&self.raw, OFF_TABLE_OFFSET)
    }
    pub fn max_table_entries(&self) -> u32 {
        be32(&self.raw, OFF_MAX_TABLE_ENTRIES)
    }
    pub fn block_size(&self) -> u32 {
        be32(&self.raw, OFF_BLOCK_SIZE)
    }
    pub fn parent_uuid(&self) -> [u8; 16] {
        let mut u = [0u8; 16];
        u.copy_from_slice(&self.raw[OFF_PARENT_UUID..OFF_PARENT_UUID + 16]);
        u
    }
    pub fn parent_timestamp(&self) -> u32 {
        be32(&self.raw, OFF_PARENT_TIMESTAMP)
    }

    /// The parent's unicode name (UTF-16BE, NUL padded), lossily decoded;
    /// `None` when empty.
    pub fn parent_name(&self) -> Option<String> {
        let b = &self.raw[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_LEN];
        let units: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        if units.is_empty() {
            None
        } else {
            Some(String::from_utf16_lossy(&units))
        }
    }

    pub fn set_table(&mut self, table_offset: u64, max_table_entries: u32) {
        put64(&mut self.raw, OFF_TABLE_OFFSET, table_offset);
        put32(&mut self.raw, OFF_MAX_TABLE_ENTRIES, max_table_entries);
    }

    /// Record the parent: UUID, modification time and unicode name (the
    /// name is truncated to what fits in 512 bytes of UTF-16BE).
    pub fn set_parent(&mut self, uuid: [u8; 16], timestamp: u32, name: &str) {
        self.raw[OFF_PARENT_UUID..OFF_PARENT_UUID + 16].copy_from_slice(&uuid);
        put32(&mut self.raw, OFF_PARENT_TIMESTAMP, timestamp);
        let field = &mut self.raw[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_LEN];
        field.fill(0);
        let mut i = 0;
        for unit in name.encode_utf16() {
            if i + 2 > PARENT_NAME_LEN {
                break;
            }
            field[i..i + 2].copy_from_slice(&unit.to_be_bytes());
            i += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrips_with_parent() {
        let mut h = Header::new(1536, 50, 2 << 20);
        h.set_parent([9; 16], 77, "base.vhd");
        h.locators[0] = LocatorEntry {
            code: LocatorCode::W2ru,
            data_space: 512,
            data_len: 22,
            data_offset: 4096,
        };
        let b = h.to_bytes();
        let g = Header::parse(&b).unwrap();
        assert_eq!(g.table_offset(), 1536);
        assert_eq!(g.max_table_entries(), 50);
        assert_eq!(g.block_size(), 2 << 20);
        assert_eq!(g.parent_uuid(), [9; 16]);
        assert_eq!(g.parent_timestamp(), 77);
        assert_eq!(g.parent_name().as_deref(), Some("base.vhd"));
        assert_eq!(g.locators[0].code, LocatorCode::W2ru);
        assert_eq!(g.locators[0].data_offset, 4096);
        assert_eq!(g, h.clone_reparsed());
    }

    impl Header {
        fn clone_reparsed(&self) -> Header {
            Header::parse(&self.to_bytes()).unwrap()
        }
    }

    fn with(h: &Header, f: impl FnOnce(&mut [u8; HEADER_SIZE])) -> [u8; HEADER_SIZE] {
        let mut b = h.to_bytes();
        f(&mut b);
        put32(&mut b, OFF_CHECKSUM, 0);
        let c = checksum(&b, OFF_CHECKSUM);
        put32(&mut b, OFF_CHECKSUM, c);
        b
    }

    #[test]
    fn header_block_size_not_power_of_two_is_rejected() {
        let h = Header::new(1536, 1, 2 << 20);
        let b = with(&h, |b| put32(b, OFF_BLOCK_SIZE, 3 << 20));
        let e = Header::parse(&b).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Corrupt {
                field: "header.block_size",
                ..
            }
        ));
        let b = with(&h, |b| put32(b, OFF_BLOCK_SIZE, 0));
        assert!(Header::parse(&b).is_err());
        let b = with(&h, |b| put32(b, OFF_BLOCK_SIZE, 1 << 31));
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn header_bad_checksum_cookie_version_are_rejected() {
        let h = Header::new(1536, 1, 2 << 20);
        let mut b = h.to_bytes();
        b[900] ^= 1;
        assert!(matches!(
            Header::parse(&b).unwrap_err(),
            ImageError::Corrupt {
                field: "header.checksum",
                ..
            }
        ));
        let b = with(&h, |b| b[0] = b'X');
        assert!(matches!(
            Header::parse(&b).unwrap_err(),
            ImageError::Corrupt {
                field: "header.cookie",
                ..
            }
        ));
        let b = with(&h, |b| put32(b, OFF_VERSION, 2));
        assert!(matches!(
            Header::parse(&b).unwrap_err(),
            ImageError::Corrupt {
                field: "header.version",
                ..
            }
        ));
        let b = with(&h, |b| put32(b, OFF_LOCATORS, 0x1234));
        assert!(matches!(
            Header::parse(&b).unwrap_err(),
            ImageError::Corrupt {
                field: "header.parent_locator.code",
                ..
            }
        ));
    }
}
