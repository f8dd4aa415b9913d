//! Big-endian field access on fixed-size on-disk structures.
//!
//! Callers index with constant offsets into buffers whose length is fixed by
//! the type (`[u8; 512]`, `[u8; 1024]`), so these cannot go out of bounds for
//! the structures they are used on; they still take slices to stay generic.

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// The VHD checksum: ones' complement of the byte sum, with the 4-byte
/// checksum field at `field` counted as zero.
pub(crate) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    !sum
}

/// Round `v` up to a multiple of the sector size, `None` on overflow.
pub(crate) fn round_up_sector(v: u64) -> Option<u64> {
    Some(v.checked_add(511)? & !511)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut b = [1u8; 16];
        let c = checksum(&b, 4);
        b[4..8].copy_from_slice(&[0xff; 4]);
        assert_eq!(checksum(&b, 4), c);
        assert_eq!(c, !12u32);
    }

    #[test]
    fn round_up_sector_overflow_is_none() {
        assert_eq!(round_up_sector(1), Some(512));
        assert_eq!(round_up_sector(512), Some(512));
        assert_eq!(round_up_sector(u64::MAX), None);
    }
}
