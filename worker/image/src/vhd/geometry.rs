//! CHS disk geometry, as the VHD footer stores it.
//!
//! Virtual PC (and qemu, for most creators) derive the disk size from the
//! geometry rather than from `current_size`; we compute geometry with the
//! algorithm of the VHD specification so that tools that use it agree.

/// Cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

/// 65535 x 16 x 255: the largest geometry; qemu then uses `current_size`.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

impl Chs {
    /// Number of sectors the geometry describes.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// Geometry for a disk of `bytes`, per the VHD specification
    /// (sectors rounded up, at least one; capped at the maximum geometry).
    pub fn for_size(bytes: u64) -> Chs {
        let secs = bytes.div_ceil(512).clamp(1, MAX_GEOMETRY_SECTORS);
        let (spt, heads, cth);
        if secs >= 65535 * 16 * 63 {
            spt = 255u64;
            heads = 16u64;
            cth = secs / spt;
        } else {
            let mut s = 17u64;
            let mut c = secs / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = secs / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = secs / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        // All three fit by construction: spt <= 255, heads <= 16 and
        // cth / heads <= 65535 because secs <= MAX_GEOMETRY_SECTORS.
        Chs {
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Chs {
        Chs {
            cylinders: super::endian::be16(b, 0),
            heads: b[2],
            sectors_per_track: b[3],
        }
    }

    pub(crate) fn to_bytes(self) -> [u8; 4] {
        let c = self.cylinders.to_be_bytes();
        [c[0], c[1], self.heads, self.sectors_per_track]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_known_qemu_values() {
        // qemu-img create -f vpc 10M reports 10485760 rounded to CHS:
        // 20 cyl * 16 heads? no: 10 MiB = 20480 sectors -> spt 17.
        let g = Chs::for_size(10 << 20);
        assert_eq!(g.sectors_per_track, 17);
        assert_eq!(g.heads, 4);
        assert_eq!(g.cylinders, 301);
        assert_eq!(g.sectors(), 20468);
    }

    #[test]
    fn geometry_caps_at_maximum() {
        let g = Chs::for_size(4 << 40);
        assert_eq!(g.sectors(), MAX_GEOMETRY_SECTORS);
    }

    #[test]
    fn geometry_of_zero_is_one_sector_worth() {
        let g = Chs::for_size(0);
        assert_eq!(g.sectors(), 0); // 1 sector / 17 spt rounds to 0 cylinders
        assert_eq!(g.heads, 4);
    }

    #[test]
    fn geometry_roundtrips_through_bytes() {
        let g = Chs::for_size(1 << 30);
        assert_eq!(Chs::from_bytes(&g.to_bytes()), g);
    }
}
