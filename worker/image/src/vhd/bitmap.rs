//! Sector bitmaps: one bit per 512-byte sector of a block, most significant
//! bit first, stored in front of the block's data and padded to a sector.
//! A set bit means "this layer holds the sector"; a clear one means "ask
//! the parent" (differencing) or "zero" (dynamic).

/// Bytes of bitmap in front of each block of `block_size` bytes.
pub fn bitmap_bytes(block_size: u32) -> u32 {
    let bits = block_size / 512;
    let bytes = bits.div_ceil(8);
    bytes.div_ceil(512).max(1) * 512
}

pub fn test(map: &[u8], sector: usize) -> bool {
    map[sector / 8] & (0x80 >> (sector % 8)) != 0
}

/// Set `count` bits from `start`; returns whether any bit changed.
pub fn set_range(map: &mut [u8], start: usize, count: usize) -> bool {
    let mut changed = false;
    for s in start..start + count {
        let (byte, mask) = (s / 8, 0x80u8 >> (s % 8));
        if map[byte] & mask == 0 {
            map[byte] |= mask;
            changed = true;
        }
    }
    changed
}

/// Whether every one of the first `sectors` bits is set.
pub fn is_full(map: &[u8], sectors: usize) -> bool {
    let whole = sectors / 8;
    if map[..whole].iter().any(|&b| b != 0xff) {
        return false;
    }
    (whole * 8..sectors).all(|s| test(map, s))
}

/// Whether every one of the first `sectors` bits is clear.
pub fn is_empty(map: &[u8], sectors: usize) -> bool {
    (0..sectors).all(|s| !test(map, s))
}

/// The value of bit `start` and how many bits from `start` (at most
/// `limit - start`) share it.
pub fn run(map: &[u8], start: usize, limit: usize) -> (bool, usize) {
    let v = test(map, start);
    let mut s = start + 1;
    while s < limit {
        // Skip whole bytes that match when byte aligned.
        if s.is_multiple_of(8) && s + 8 <= limit {
            let want = if v { 0xff } else { 0x00 };
            if map[s / 8] == want {
                s += 8;
                continue;
            }
        }
        if test(map, s) != v {
            break;
        }
        s += 1;
    }
    (v, s - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_size_is_padded_to_a_sector() {
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512), 512);
        assert_eq!(bitmap_bytes(8 << 20), 2048);
    }

    #[test]
    fn bitmap_is_msb_first() {
        let mut m = vec![0u8; 512];
        assert!(set_range(&mut m, 0, 1));
        assert_eq!(m[0], 0x80);
        assert!(set_range(&mut m, 9, 2));
        assert_eq!(m[1], 0x60);
        assert!(!set_range(&mut m, 9, 1));
    }

    #[test]
    fn bitmap_runs_cross_bytes() {
        let mut m = vec![0u8; 512];
        set_range(&mut m, 3, 30);
        assert_eq!(run(&m, 0, 4096), (false, 3));
        assert_eq!(run(&m, 3, 4096), (true, 30));
        assert_eq!(run(&m, 33, 4096), (false, 4096 - 33));
        assert_eq!(run(&m, 5, 10), (true, 5));
        assert!(!is_full(&m, 4096));
        set_range(&mut m, 0, 4096);
        assert!(is_full(&m, 4096));
        assert!(!is_empty(&m, 1));
    }
}
