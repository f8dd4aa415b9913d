//! Deterministic test data and O_DIRECT-ready buffers.

/// `len` reproducible, incompressible bytes for `seed` (xorshift64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A 4 KiB-aligned buffer of `len` bytes, for O_DIRECT I/O.
#[derive(Debug)]
pub struct Aligned {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub const ALIGN: usize = 4096;

    /// A zeroed buffer.
    pub fn new(len: usize) -> Self {
        let mem = vec![0u8; len + Self::ALIGN];
        let off = mem.as_ptr().align_offset(Self::ALIGN);
        Aligned { mem, off, len }
    }

    /// The whole buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }

    /// Its first `len` bytes (still aligned).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len, "{len} > {}", self.len);
        &mut self.mem[self.off..self.off + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_reproducible_and_seeds_differ() {
        assert_eq!(pattern(1001, 7), pattern(1001, 7));
        assert_ne!(pattern(64, 7), pattern(64, 8));
        assert_eq!(pattern(13, 7)[..], pattern(64, 7)[..13]);
    }

    #[test]
    fn aligned_buffer_is_aligned_and_sized() {
        for len in [512, 4096, 1 << 20] {
            let mut a = Aligned::new(len);
            assert_eq!(a.buf().len(), len);
            assert_eq!(a.buf().as_ptr() as usize % Aligned::ALIGN, 0);
            assert_eq!(a.get(512).len(), 512);
        }
    }
}
