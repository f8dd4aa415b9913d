//! Minor numbers: the broker-owned names of attached disks.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A minor number, 0..[`Minor::COUNT`], as blktap's `tapdevN`. Checked
/// when deserialized too: a peer cannot send one out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16")]
pub struct Minor(u16);

/// A number outside 0..=16383 was given as a minor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("minor {0} is out of range (0..={max})", max = Minor::COUNT - 1)]
pub struct MinorOutOfRange(pub u64);

impl TryFrom<u16> for Minor {
    type Error = MinorOutOfRange;
    fn try_from(n: u16) -> Result<Self, MinorOutOfRange> {
        Minor::new(u64::from(n))
    }
}

impl Minor {
    /// How many minors exist (blktap's limit).
    pub const COUNT: u16 = 16384;

    /// Directory where the broker publishes device symlinks.
    pub const DEVICE_DIR: &'static str = "/dev/tapjail";

    pub fn new(n: u64) -> Result<Self, MinorOutOfRange> {
        match u16::try_from(n) {
            Ok(m) if m < Self::COUNT => Ok(Minor(m)),
            _ => Err(MinorOutOfRange(n)),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// `tapdevN`, the device name under [`Minor::DEVICE_DIR`].
    pub fn device_name(self) -> String {
        format!("tapdev{}", self.0)
    }

    /// `/dev/tapjail/tapdevN`.
    pub fn device_path(self) -> String {
        format!("{}/{}", Self::DEVICE_DIR, self.device_name())
    }
}

impl fmt::Display for Minor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Minor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u64 = s
            .parse()
            .map_err(|_| format!("minor {s:?} is not a number"))?;
        Minor::new(n).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_range_is_enforced() {
        assert!(Minor::new(0).is_ok());
        assert_eq!(Minor::new(16383).unwrap().get(), 16383);
        assert_eq!(Minor::new(16384), Err(MinorOutOfRange(16384)));
        assert!("abc".parse::<Minor>().is_err());
        assert!("-1".parse::<Minor>().is_err());
        assert_eq!(
            "7".parse::<Minor>().unwrap().device_path(),
            "/dev/tapjail/tapdev7"
        );
    }

    #[test]
    fn minor_deserialize_out_of_range_is_rejected() {
        // A peer's frame is untrusted: no Minor outside the range may come
        // out of it (postcard encodes a u16 the same as a Minor).
        for n in [16384u16, 40000, u16::MAX] {
            let bytes = postcard::to_allocvec(&n).unwrap();
            assert!(postcard::from_bytes::<Minor>(&bytes).is_err(), "{n}");
        }
        let bytes = postcard::to_allocvec(&16383u16).unwrap();
        assert_eq!(postcard::from_bytes::<Minor>(&bytes).unwrap().get(), 16383);
        let round = postcard::to_allocvec(&Minor::new(5).unwrap()).unwrap();
        assert_eq!(postcard::from_bytes::<Minor>(&round).unwrap().get(), 5);
    }

    #[test]
    fn minor_out_of_range_message_names_the_inclusive_range() {
        assert_eq!(
            Minor::new(16384).unwrap_err().to_string(),
            "minor 16384 is out of range (0..=16383)"
        );
    }
}
