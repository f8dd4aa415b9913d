//! blktap's encrypted VHDs (`drivers/block-crypto.c`, `crypto/xts_aes.h`),
//! written from its format, not its code:
//!
//! - The key (32 bytes: AES-128-XTS, 64: AES-256-XTS, OpenSSL's XTS key
//!   layout: data key then tweak key) is checked against the keyhash in
//!   the batmap header (byte 29: cookie, then a 32-byte nonce and
//!   SHA-256(nonce || key)).
//! - Every 512-byte data sector is encrypted on its own with the "plain"
//!   IV: the disk's virtual sector number truncated to 32 bits, little
//!   endian, zero-padded to 16 bytes (so sectors 2^32 apart share a tweak,
//!   exactly as blktap does). Metadata (footer, header, BAT, bitmaps,
//!   batmap) stays plain; holes read as zeroes without decryption.
//! - Each chain member whose batmap carries a keyhash is encrypted (and
//!   must match the key); a parent without one is plain. A leaf without a
//!   keyhash given a key is refused, as tapdisk refuses it.

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use sha2::{Digest, Sha256};
use tapjail_common::secret::Secret;
use xts_mode::Xts128;

use crate::ImageError;

pub const SECTOR: usize = 512;
/// `struct vhd_keyhash` in the batmap header: cookie, nonce, hash.
pub const KEYHASH_OFFSET: usize = 29;
pub const NONCE_BYTES: usize = 32;
pub const HASH_BYTES: usize = 32;

/// The keyhash of an encrypted VHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyhash {
    pub nonce: [u8; NONCE_BYTES],
    pub hash: [u8; HASH_BYTES],
}

impl Keyhash {
    /// From the 512-byte batmap header sector; `None` when the cookie is 0.
    pub fn from_header(sector: &[u8]) -> Option<Keyhash> {
        let k = sector.get(KEYHASH_OFFSET..KEYHASH_OFFSET + 1 + NONCE_BYTES + HASH_BYTES)?;
        if k[0] == 0 {
            return None;
        }
        let mut nonce = [0u8; NONCE_BYTES];
        let mut hash = [0u8; HASH_BYTES];
        nonce.copy_from_slice(&k[1..1 + NONCE_BYTES]);
        hash.copy_from_slice(&k[1 + NONCE_BYTES..]);
        Some(Keyhash { nonce, hash })
    }

    /// Write cookie 1, nonce and hash into a batmap header sector.
    pub fn store(&self, sector: &mut [u8]) {
        sector[KEYHASH_OFFSET] = 1;
        sector[KEYHASH_OFFSET + 1..KEYHASH_OFFSET + 1 + NONCE_BYTES].copy_from_slice(&self.nonce);
        sector[KEYHASH_OFFSET + 1 + NONCE_BYTES..KEYHASH_OFFSET + 1 + NONCE_BYTES + HASH_BYTES]
            .copy_from_slice(&self.hash);
    }

    /// blktap's `vhd_calculate_keyhash`: SHA-256 over nonce || key.
    pub fn compute(nonce: [u8; NONCE_BYTES], key: &[u8]) -> Keyhash {
        let mut h = Sha256::new();
        h.update(nonce);
        h.update(key);
        let mut hash = [0u8; HASH_BYTES];
        hash.copy_from_slice(&h.finalize());
        Keyhash { nonce, hash }
    }

    /// Whether `key` is the key this hash was made from.
    pub fn matches(&self, key: &[u8]) -> bool {
        let mine = Keyhash::compute(self.nonce, key).hash;
        // Constant time: no early exit on the first differing byte.
        mine.iter()
            .zip(&self.hash)
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
    }
}

enum Inner {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// The per-layer sector cipher. The expanded AES keys live in this
/// worker's memory, which is mlockall()ed (never swapped), and are
/// zeroized when the layer is dropped (the `aes` crate's `zeroize`
/// feature), on `Close` as on a failed open.
pub struct SectorCipher(Inner);

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Inner::Aes128(_) => "SectorCipher(aes-128-xts-plain)",
            Inner::Aes256(_) => "SectorCipher(aes-256-xts-plain)",
        })
    }
}

/// blktap's `xts_aes_plain_iv_generate`.
pub fn plain_tweak(sector: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&(sector as u32).to_le_bytes());
    t
}

impl SectorCipher {
    /// A cipher for `key` (32 or 64 bytes).
    pub fn new(key: &[u8]) -> Result<SectorCipher, ImageError> {
        let bad = || {
            ImageError::InvalidArgument(format!(
                "an encryption key of {} bytes: blktap takes 32 (AES-128-XTS) or 64 (AES-256-XTS)",
                key.len()
            ))
        };
        let half = key.len() / 2;
        let inner = match key.len() {
            32 => Inner::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..half]).map_err(|_| bad())?,
                Aes128::new_from_slice(&key[half..]).map_err(|_| bad())?,
            ))),
            64 => Inner::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..half]).map_err(|_| bad())?,
                Aes256::new_from_slice(&key[half..]).map_err(|_| bad())?,
            ))),
            _ => return Err(bad()),
        };
        Ok(SectorCipher(inner))
    }

    /// Encrypt whole sectors in place; `first` is the virtual sector of
    /// `buf[0]`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let t = plain_tweak(first + i as u64);
            match &self.0 {
                Inner::Aes128(x) => x.encrypt_sector(s, t),
                Inner::Aes256(x) => x.encrypt_sector(s, t),
            }
        }
    }

    /// Decrypt whole sectors in place; `first` as for [`Self::encrypt`].
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let t = plain_tweak(first + i as u64);
            match &self.0 {
                Inner::Aes128(x) => x.decrypt_sector(s, t),
                Inner::Aes256(x) => x.decrypt_sector(s, t),
            }
        }
    }
}

/// Check `key` against a layer's keyhash and make its cipher; the error
/// names the file and what to do, never the key.
pub fn cipher_for(name: &str, keyhash: &Keyhash, key: &Secret) -> Result<SectorCipher, ImageError> {
    let cipher = SectorCipher::new(key.expose())?;
    if !keyhash.matches(key.expose()) {
        return Err(ImageError::InvalidArgument(format!(
            "{name}: the encryption key does not match the keyhash in its batmap header \
             (wrong key); nothing was read or written: supply the key this image was made with"
        )));
    }
    Ok(cipher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyhash_is_sha256_of_nonce_then_key() {
        // SHA-256 of 32 zero bytes followed by "abc" * ... checked against
        // an independent computation: sha256(b"\0"*32 + b"k"*32).
        let k = Keyhash::compute([0; 32], &[b'k'; 32]);
        let mut h = Sha256::new();
        h.update([0u8; 64 - 32]);
        h.update([b'k'; 32]);
        assert_eq!(&k.hash[..], &h.finalize()[..]);
        assert!(k.matches(&[b'k'; 32]));
        assert!(!k.matches(&[b'j'; 32]));
        let mut sector = [0u8; 512];
        k.store(&mut sector);
        assert_eq!(Keyhash::from_header(&sector), Some(k));
        assert_eq!(Keyhash::from_header(&[0u8; 512]), None);
    }

    #[test]
    fn plain_tweak_truncates_to_32_bits_little_endian() {
        assert_eq!(plain_tweak(1)[..5], [1, 0, 0, 0, 0]);
        assert_eq!(plain_tweak(0x1_0000_0002), plain_tweak(2));
        assert_eq!(plain_tweak(0x0403_0201)[..4], [1, 2, 3, 4]);
    }

    #[test]
    fn sectors_roundtrip_and_differ_by_position() {
        for len in [32, 64] {
            let c = SectorCipher::new(&vec![7u8; len]).unwrap();
            let plain = vec![0x5au8; 1024];
            let mut b = plain.clone();
            c.encrypt(&mut b, 10);
            assert_ne!(b, plain);
            assert_ne!(b[..512], b[512..], "each sector has its own tweak");
            c.decrypt(&mut b, 10);
            assert_eq!(b, plain);
        }
        assert!(SectorCipher::new(&[0u8; 48]).is_err());
    }
}
