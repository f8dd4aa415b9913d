//! Parent locators: where a differencing image says its parent lives.
//!
//! blktap writes three per child, all holding the path *relative to the
//! child* (`./base.vhd`): `MacX` (UTF-8 `file://` URL), `W2ku` and `W2ru`
//! (UTF-16LE, `\`-separated). Windows writes absolute `W2ku` paths with a
//! drive letter. Decoding is careful: these bytes are untrusted.

use crate::{ImageError, ParentLocator};

/// Longest locator payload we read (a 4096-byte path in UTF-16 is 8 KiB).
pub const MAX_LOCATOR_LEN: u32 = 16 << 10;

/// Platform codes of the parent locator entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocatorCode {
    #[default]
    None,
    /// Deprecated Windows relative (ANSI); recognised, never read.
    Wi2r,
    /// Deprecated Windows absolute (ANSI); recognised, never read.
    Wi2k,
    /// Windows relative path, UTF-16LE.
    W2ru,
    /// Windows absolute path, UTF-16LE.
    W2ku,
    /// Mac OS alias blob; recognised, never read.
    Mac,
    /// File URL, UTF-8.
    MacX,
}

impl LocatorCode {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => LocatorCode::None,
            0x5769_3272 => LocatorCode::Wi2r,
            0x5769_326B => LocatorCode::Wi2k,
            0x5732_7275 => LocatorCode::W2ru,
            0x5732_6B75 => LocatorCode::W2ku,
            0x4D61_6320 => LocatorCode::Mac,
            0x4D61_6358 => LocatorCode::MacX,
            _ => return None,
        })
    }

    pub fn to_u32(self) -> u32 {
        match self {
            LocatorCode::None => 0,
            LocatorCode::Wi2r => 0x5769_3272,
            LocatorCode::Wi2k => 0x5769_326B,
            LocatorCode::W2ru => 0x5732_7275,
            LocatorCode::W2ku => 0x5732_6B75,
            LocatorCode::Mac => 0x4D61_6320,
            LocatorCode::MacX => 0x4D61_6358,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LocatorCode::None => "none",
            LocatorCode::Wi2r => "Wi2r",
            LocatorCode::Wi2k => "Wi2k",
            LocatorCode::W2ru => "W2ru",
            LocatorCode::W2ku => "W2ku",
            LocatorCode::Mac => "Mac ",
            LocatorCode::MacX => "MacX",
        }
    }

    /// The codes whose payload we decode into a path.
    pub fn is_readable(self) -> bool {
        matches!(
            self,
            LocatorCode::W2ru | LocatorCode::W2ku | LocatorCode::MacX
        )
    }
}

/// One of the eight locator slots of the dynamic header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocatorEntry {
    pub code: LocatorCode,
    /// Space reserved for the payload: in sectors per the specification,
    /// in bytes as Windows and blktap write it (see [`Self::space_bytes`]).
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Bytes reserved at `data_offset`, with blktap's reading of the
    /// ambiguous `data_space`: under 512 it counts sectors, otherwise
    /// bytes (then it must be a whole number of sectors). `None` if it is
    /// neither.
    pub fn space_bytes(&self) -> Option<u64> {
        let s = u64::from(self.data_space);
        if s < 512 {
            Some(s * 512)
        } else if s % 512 == 0 {
            Some(s)
        } else {
            None
        }
    }

    pub fn is_used(&self) -> bool {
        self.code != LocatorCode::None
    }
}

/// Decode a locator payload into a `/`-separated path.
pub fn decode(code: LocatorCode, payload: &[u8]) -> Result<ParentLocator, ImageError> {
    let bad = |why: &str| ImageError::corrupt("header.parent_locator.data", why.to_string());
    let path = match code {
        LocatorCode::MacX => {
            let s = std::str::from_utf8(payload).map_err(|_| bad("MacX locator is not UTF-8"))?;
            let s = s.trim_end_matches('\0');
            let p = s
                .strip_prefix("file://")
                .ok_or_else(|| bad("MacX locator is not a file:// URL"))?;
            percent_decode(p).ok_or_else(|| bad("MacX locator has a bad %-escape"))?
        }
        LocatorCode::W2ku | LocatorCode::W2ru => {
            if !payload.len().is_multiple_of(2) {
                return Err(bad("UTF-16 locator has an odd length"));
            }
            let units: Vec<u16> = payload
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            let s = String::from_utf16(&units).map_err(|_| bad("locator is not valid UTF-16"))?;
            let s = s.replace('\\', "/");
            match s.get(..2) {
                Some(d) if d.eq_ignore_ascii_case("c:") => s[2..].to_string(),
                _ => s,
            }
        }
        _ => return Err(bad("locator kind holds no path")),
    };
    if path.is_empty() || path.contains('\0') {
        return Err(bad("empty path"));
    }
    Ok(ParentLocator {
        code: code.as_str().to_string(),
        relative: !path.starts_with('/'),
        path,
    })
}

/// Encode `path` (`/`-separated) as a locator payload, the way blktap does:
/// relative UTF-16 paths start with `.\`.
pub fn encode(code: LocatorCode, path: &str) -> Result<Vec<u8>, ImageError> {
    let out = match code {
        LocatorCode::MacX => format!("file://{path}").into_bytes(),
        LocatorCode::W2ku | LocatorCode::W2ru => {
            let p = if path.starts_with('/') {
                path.to_string()
            } else {
                format!(".\\{}", path.strip_prefix("./").unwrap_or(path))
            };
            p.replace('/', "\\")
                .encode_utf16()
                .flat_map(|u| u.to_le_bytes())
                .collect()
        }
        _ => {
            return Err(ImageError::InvalidArgument(format!(
                "cannot encode a {} locator",
                code.as_str()
            )))
        }
    };
    if out.len() > MAX_LOCATOR_LEN as usize {
        return Err(ImageError::InvalidArgument(format!(
            "parent path is too long for a locator ({} bytes)",
            out.len()
        )));
    }
    Ok(out)
}

/// Undo `%XX` escapes of a file URL (blktap writes none; others may).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_blktap_relative_forms_decode_to_dot_slash() {
        for code in [LocatorCode::W2ru, LocatorCode::W2ku, LocatorCode::MacX] {
            let enc = encode(code, "./base.vhd").unwrap();
            let l = decode(code, &enc).unwrap();
            assert_eq!(l.path, "./base.vhd", "{code:?}");
            assert!(l.relative);
        }
    }

    #[test]
    fn locator_absolute_windows_path_drops_drive() {
        let raw: Vec<u8> = "C:\\images\\base.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let l = decode(LocatorCode::W2ku, &raw).unwrap();
        assert_eq!(l.path, "/images/base.vhd");
        assert!(!l.relative);
    }

    #[test]
    fn locator_garbage_is_a_corrupt_error() {
        assert!(decode(LocatorCode::MacX, b"http://x").is_err());
        assert!(decode(LocatorCode::MacX, &[0xff, 0xfe]).is_err());
        assert!(decode(LocatorCode::W2ru, &[1, 2, 3]).is_err());
        assert!(decode(LocatorCode::W2ru, &[0, 0xd8, 0, 0]).is_err());
        assert!(decode(LocatorCode::W2ru, &[]).is_err());
        assert!(decode(LocatorCode::Mac, b"alias").is_err());
        assert!(decode(LocatorCode::MacX, b"file://%zz").is_err());
    }

    #[test]
    fn locator_space_follows_blktap_rules() {
        let mut e = LocatorEntry {
            code: LocatorCode::W2ru,
            data_space: 1,
            ..Default::default()
        };
        assert_eq!(e.space_bytes(), Some(512));
        e.data_space = 1024;
        assert_eq!(e.space_bytes(), Some(1024));
        e.data_space = 1000;
        assert_eq!(e.space_bytes(), None);
    }
}
