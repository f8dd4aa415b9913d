//! The 512-byte hard disk footer every VHD ends with (and dynamic and
//! differencing images also start with).

use super::endian::{be32, be64, checksum, put32, put64};
use super::geometry::{Chs, MAX_GEOMETRY_SECTORS};
use super::MAX_VIRTUAL_SIZE;
use crate::ImageError;

pub const FOOTER_SIZE: usize = 512;
pub const COOKIE: &[u8; 8] = b"conectix";
/// Creator application we write: the one blktap writes, so that qemu (and
/// XenServer) take `current_size` as the disk size.
pub const CREATOR_TAP: [u8; 4] = *b"tap\0";
/// blktap's current creator version (1.3): images with version >= 1.2 carry
/// a batmap.
pub const CREATOR_VERSION: u32 = 0x0001_0003;
/// Creator version that tells blktap "may have a batmap; trust it only if
/// its header is valid". `repair` uses it to drop a broken batmap.
pub const CREATOR_VERSION_OPTIONAL_BATMAP: u32 = 0x0001_0001;
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Feature bit 1 ("reserved") must always be set.
pub const FEATURES_RESERVED: u32 = 0x2;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_GEOMETRY: usize = 56;
const OFF_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UUID: usize = 68;
const OFF_SAVED: usize = 84;
const OFF_HIDDEN: usize = 85;

/// The three disk types of the VHD format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// `fixed`, `dynamic` or `differencing`, as `query` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }

    /// Dynamic and differencing images have a header, a BAT and blocks.
    pub fn is_sparse(self) -> bool {
        !matches!(self, DiskType::Fixed)
    }
}

/// A parsed, checksum-verified footer. Unknown and reserved bytes are kept
/// so that rewriting a footer preserves what other tools stored there
/// (blktap's `hidden` flag, for one).
#[derive(Clone, PartialEq, Eq)]
pub struct Footer {
    raw: [u8; FOOTER_SIZE],
    pub disk_type: DiskType,
}

impl std::fmt::Debug for Footer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Footer")
            .field("disk_type", &self.disk_type)
            .field("creator_app", &self.creator_app())
            .field("current_size", &self.current_size())
            .field("data_offset", &self.data_offset())
            .field("uuid", &format_uuid(&self.uuid()))
            .finish()
    }
}

impl Footer {
    /// Parse and verify a footer. `buf` is 512 bytes, or 511 for writers
    /// that leave a short footer (the missing byte reads as zero).
    pub fn parse(buf: &[u8]) -> Result<Footer, ImageError> {
        if buf.len() != FOOTER_SIZE && buf.len() != FOOTER_SIZE - 1 {
            return Err(ImageError::corrupt("footer", "not 511 or 512 bytes"));
        }
        let mut raw = [0u8; FOOTER_SIZE];
        raw[..buf.len()].copy_from_slice(buf);
        if &raw[..8] != COOKIE {
            return Err(ImageError::corrupt(
                "footer.cookie",
                // The bytes found are not quoted: an error may reach someone
                // who could not read the file (defence in depth; the broker
                // opens only files the tenant may read).
                "expected \"conectix\": this is not a VHD footer",
            ));
        }
        let stored = be32(&raw, OFF_CHECKSUM);
        let computed = checksum(&raw, OFF_CHECKSUM);
        if stored != computed {
            return Err(ImageError::corrupt(
                "footer.checksum",
                format!("stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let code = be32(&raw, OFF_TYPE);
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            ImageError::corrupt("footer.disk_type", format!("unknown disk type {code}"))
        })?;
        Ok(Footer { raw, disk_type })
    }

    /// A footer from a sector whose cookie or checksum is damaged but whose
    /// fields are not (for `repair`): the cookie is restored and the
    /// checksum recomputed on write. `None` unless the file format version
    /// and the disk type are a VHD's, so arbitrary data is not taken.
    pub fn from_damaged(sector: &[u8; FOOTER_SIZE]) -> Option<Footer> {
        let mut raw = *sector;
        raw[..8].copy_from_slice(COOKIE);
        if be32(&raw, OFF_VERSION) != FILE_FORMAT_VERSION {
            return None;
        }
        let disk_type = DiskType::from_code(be32(&raw, OFF_TYPE))?;
        Some(Footer { raw, disk_type })
    }

    /// A fresh footer as we create images: creator `tap\0`, geometry from
    /// the size, a random UUID.
    pub fn new(disk_type: DiskType, size: u64, uuid: [u8; 16], timestamp: u32) -> Footer {
        let mut raw = [0u8; FOOTER_SIZE];
        raw[..8].copy_from_slice(COOKIE);
        put32(&mut raw, OFF_FEATURES, FEATURES_RESERVED);
        put32(&mut raw, OFF_VERSION, FILE_FORMAT_VERSION);
        put64(
            &mut raw,
            OFF_DATA_OFFSET,
            if disk_type.is_sparse() { 512 } else { u64::MAX },
        );
        put32(&mut raw, OFF_TIMESTAMP, timestamp);
        raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&CREATOR_TAP);
        put32(&mut raw, OFF_CREATOR_VERSION, CREATOR_VERSION);
        put32(&mut raw, OFF_CREATOR_OS, 0);
        put64(&mut raw, OFF_ORIGINAL_SIZE, size);
        put64(&mut raw, OFF_CURRENT_SIZE, size);
        raw[OFF_GEOMETRY..OFF_GEOMETRY + 4].copy_from_slice(&Chs::for_size(size).to_bytes());
        put32(&mut raw, OFF_TYPE, disk_type.code());
        raw[OFF_UUID..OFF_UUID + 16].copy_from_slice(&uuid);
        Footer { raw, disk_type }
    }

    /// The footer as stored, with a freshly computed checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = self.raw;
        put32(&mut raw, OFF_TYPE, self.disk_type.code());
        put32(&mut raw, OFF_CHECKSUM, 0);
        let c = checksum(&raw, OFF_CHECKSUM);
        put32(&mut raw, OFF_CHECKSUM, c);
        raw
    }

    pub fn features(&self) -> u32 {
        be32(&self.raw, OFF_FEATURES)
    }
    pub fn file_format_version(&self) -> u32 {
        be32(&self.raw, OFF_VERSION)
    }
    pub fn data_offset(&self) -> u64 {
        be64(&self.raw, OFF_DATA_OFFSET)
    }
    pub fn timestamp(&self) -> u32 {
        be32(&self.raw, OFF_TIMESTAMP)
    }
    pub fn creator_app(&self) -> [u8; 4] {
        let mut a = [0u8; 4];
        a.copy_from_slice(&self.raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4]);
        a
    }
    pub fn creator_version(&self) -> u32 {
        be32(&self.raw, OFF_CREATOR_VERSION)
    }
    pub fn original_size(&self) -> u64 {
        be64(&self.raw, OFF_ORIGINAL_SIZE)
    }
    pub fn current_size(&self) -> u64 {
        be64(&self.raw, OFF_CURRENT_SIZE)
    }
    pub fn geometry(&self) -> Chs {
        Chs::from_bytes(&self.raw[OFF_GEOMETRY..OFF_GEOMETRY + 4])
    }
    pub fn uuid(&self) -> [u8; 16] {
        let mut u = [0u8; 16];
        u.copy_from_slice(&self.raw[OFF_UUID..OFF_UUID + 16]);
        u
    }
    pub fn saved_state(&self) -> u8 {
        self.raw[OFF_SAVED]
    }
    pub fn hidden(&self) -> u8 {
        self.raw[OFF_HIDDEN]
    }

    pub fn set_creator_app(&mut self, app: [u8; 4]) {
        self.raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&app);
    }

    pub fn set_creator_version(&mut self, v: u32) {
        put32(&mut self.raw, OFF_CREATOR_VERSION, v);
    }

    /// Change the disk size: `current_size` and the geometry together.
    pub fn set_current_size(&mut self, size: u64) {
        put64(&mut self.raw, OFF_CURRENT_SIZE, size);
        self.raw[OFF_GEOMETRY..OFF_GEOMETRY + 4].copy_from_slice(&Chs::for_size(size).to_bytes());
    }

    /// Point the footer at a dynamic header elsewhere in the file: one
    /// sector to write, so a header can be replaced crash-safely (see
    /// [`super::modify`]).
    pub fn set_data_offset(&mut self, offset: u64) {
        put64(&mut self.raw, OFF_DATA_OFFSET, offset);
    }

    pub fn set_uuid(&mut self, uuid: [u8; 16]) {
        self.raw[OFF_UUID..OFF_UUID + 16].copy_from_slice(&uuid);
    }

    /// Whether the size comes from `current_size` rather than the CHS
    /// geometry. This is qemu's rule (block/vpc.c, `vpc_ignore_current_size`
    /// since qemu 10.0): only Virtual PC (`vpc `) and qemu's own old images
    /// (`qemu`) are sized by geometry; every other creator (`tap\0` of
    /// blktap and us, `win `, `qem2`, `d2v `, `CTXS`, `wa\0\0`, unknown
    /// ones) by `current_size`; so is any image whose geometry is the
    /// maximum one.
    pub fn size_from_current_size(&self) -> bool {
        let app = self.creator_app();
        !(app == *b"vpc " || app == *b"qemu") || self.geometry().sectors() == MAX_GEOMETRY_SECTORS
    }

    /// The size of the virtual disk in bytes, exactly as qemu computes it
    /// (whole sectors), checked against [`MAX_VIRTUAL_SIZE`].
    pub fn virtual_size(&self) -> Result<u64, ImageError> {
        let sectors = if self.size_from_current_size() {
            self.current_size() / 512
        } else {
            self.geometry().sectors()
        };
        match sectors.checked_mul(512) {
            Some(size) if size <= MAX_VIRTUAL_SIZE => Ok(size),
            _ => Err(ImageError::corrupt(
                if self.size_from_current_size() {
                    "footer.current_size"
                } else {
                    "footer.geometry"
                },
                format!(
                    "{sectors} sectors is more than the maximum of {} sectors",
                    MAX_VIRTUAL_SIZE / 512
                ),
            )),
        }
    }

    /// Whether this image was written by blktap (or by us).
    pub fn creator_is_tap(&self) -> bool {
        self.creator_app()[..3] == *b"tap"
    }

    /// blktap's rule for "this image has a batmap": creator tap, version
    /// 1.2 or later (version 1.1 maybe; then the batmap header decides).
    pub fn batmap_expected(&self) -> Option<bool> {
        if !self.creator_is_tap() || !self.disk_type.is_sparse() {
            return Some(false);
        }
        match self.creator_version() {
            v if v >= 0x0001_0002 => Some(true),
            0x0001_0001 => None,
            _ => Some(false),
        }
    }
}

/// Print a cookie for an error message without trusting its bytes.
pub(crate) fn show_cookie(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '.'
            }
        })
        .collect()
}

/// Canonical 8-4-4-4-12 hex form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Seconds since the VHD epoch, now (0 if the clock is before 2000).
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// A random (version 4) UUID for a new image.
pub fn new_uuid() -> Result<[u8; 16], ImageError> {
    let mut u = [0u8; 16];
    getrandom::fill(&mut u).map_err(|e| ImageError::Io {
        op: "getrandom",
        offset: 0,
        source: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_roundtrips() {
        let f = Footer::new(DiskType::Dynamic, 100 << 20, [7; 16], 1234);
        let b = f.to_bytes();
        let g = Footer::parse(&b).unwrap();
        assert_eq!(g.disk_type, DiskType::Dynamic);
        assert_eq!(g.current_size(), 100 << 20);
        assert_eq!(g.virtual_size().unwrap(), 100 << 20);
        assert_eq!(g.data_offset(), 512);
        assert_eq!(g.uuid(), [7; 16]);
        assert_eq!(g.to_bytes(), b);
    }

    #[test]
    fn footer_bad_cookie_is_rejected() {
        let mut b = Footer::new(DiskType::Fixed, 1 << 20, [1; 16], 0).to_bytes();
        b[0] = b'x';
        let e = Footer::parse(&b).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Corrupt {
                field: "footer.cookie",
                ..
            }
        ));
    }

    #[test]
    fn footer_bad_checksum_is_rejected() {
        let mut b = Footer::new(DiskType::Fixed, 1 << 20, [1; 16], 0).to_bytes();
        b[100] ^= 1;
        let e = Footer::parse(&b).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Corrupt {
                field: "footer.checksum",
                ..
            }
        ));
    }

    #[test]
    fn footer_unknown_type_is_rejected() {
        let mut f = Footer::new(DiskType::Fixed, 1 << 20, [1; 16], 0).to_bytes();
        put32(&mut f, OFF_TYPE, 9);
        put32(&mut f, OFF_CHECKSUM, 0);
        let c = checksum(&f, OFF_CHECKSUM);
        put32(&mut f, OFF_CHECKSUM, c);
        let e = Footer::parse(&f).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Corrupt {
                field: "footer.disk_type",
                ..
            }
        ));
    }

    #[test]
    fn footer_short_511_bytes_is_accepted() {
        let b = Footer::new(DiskType::Fixed, 1 << 20, [1; 16], 0).to_bytes();
        assert_eq!(b[511], 0);
        assert!(Footer::parse(&b[..511]).is_ok());
    }

    #[test]
    fn footer_size_rule_follows_creator() {
        let mut f = Footer::new(DiskType::Dynamic, 10 << 20, [1; 16], 0);
        assert_eq!(f.virtual_size().unwrap(), 10 << 20);
        f.raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(b"vpc ");
        assert_eq!(f.virtual_size().unwrap(), 20468 * 512);
        f.raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(b"qem2");
        assert_eq!(f.virtual_size().unwrap(), 10 << 20);
    }

    #[test]
    fn footer_huge_size_is_rejected() {
        let f = Footer::new(DiskType::Dynamic, u64::MAX, [1; 16], 0);
        let e = f.virtual_size().unwrap_err();
        assert!(matches!(
            e,
            ImageError::Corrupt {
                field: "footer.current_size",
                ..
            }
        ));
    }

    #[test]
    fn uuid_formats_canonically() {
        let u = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
        ];
        assert_eq!(format_uuid(&u), "12345678-9abc-def0-0001-020304050607");
        let n = new_uuid().unwrap();
        assert_eq!(n[6] >> 4, 4);
    }
}
