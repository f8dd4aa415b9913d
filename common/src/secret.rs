//! Key bytes that cross our sockets (`tap-ctl open -E` → broker → the one
//! worker serving that disk). The newtype exists so that no `{:?}`, `{}`
//! or audit line can ever print them: Debug and Display redact, and the
//! bytes are zeroized when the value is dropped. Serialized as plain bytes
//! by postcard; the frame buffers that carried them are the transport's.

use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroize;

/// blktap's accepted key sizes: 32 bytes (AES-128-XTS) or 64 (AES-256-XTS).
pub const KEY_SIZES: [usize; 2] = [32, 64];

/// Secret bytes; never printed, zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
    /// The bytes, for the cipher and the keyhash only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted; {} bytes])", self.0.len())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {}-byte key]", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_bytes() {
        let s = Secret::new(vec![0xab; 32]);
        for text in [format!("{s:?}"), format!("{s}"), format!("{:?}", Some(&s))] {
            assert!(!text.contains("ab") && !text.contains("171"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    #[test]
    fn postcard_roundtrip_keeps_the_bytes() {
        let s = Secret::new((0u8..64).collect());
        let b = postcard::to_allocvec(&s).unwrap();
        let back: Secret = postcard::from_bytes(&b).unwrap();
        assert_eq!(back.expose(), s.expose());
    }
}
