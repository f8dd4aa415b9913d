//! Format probing that refuses to guess: anything that looks even partly
//! like a VHD is not a raw disk.
//!
//! A guest owns every byte of a raw disk, so it can write a VHD footer (with
//! a parent locator naming a host file) into its last sector. A tool that
//! decides "VHD" from a cookie would then follow that locator; one that
//! decides "raw" whenever the VHD does not open would silently turn a
//! damaged VHD into garbage. Offline tools therefore take the format from
//! the user, and without it call a file raw only when none of these signs
//! is present (qemu's lesson from CVE-2008-2004).

use super::endian::{be32, checksum};
use super::footer::FILE_FORMAT_VERSION;
use crate::{Backing, ImageError};

/// Where the footer keeps its file format version, disk type and checksum.
const OFF_VERSION: usize = 12;
const OFF_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;

/// The first sign of a VHD found in `file`, as a phrase for a message
/// ("a VHD footer cookie in the last 512 bytes"), or `None` when the file
/// shows none and may be taken for raw.
pub fn vhd_sign(file: &dyn Backing) -> Result<Option<&'static str>, ImageError> {
    let len = file.len().map_err(ImageError::io("stat", 0))?;
    let read = |off: u64, buf: &mut [u8]| -> Result<bool, ImageError> {
        match off.checked_add(buf.len() as u64) {
            Some(end) if end <= len => {
                file.read_exact_at(buf, off)
                    .map_err(ImageError::io("read", off))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let mut sector = [0u8; 512];
    let end = len.checked_sub(512);
    if let Some(off) = end {
        if read(off, &mut sector)? {
            if &sector[..8] == super::footer::COOKIE {
                return Ok(Some("a VHD footer cookie (conectix) in the last 512 bytes"));
            }
            if footer_like(&sector) {
                return Ok(Some(
                    "a VHD footer with a damaged cookie in the last 512 bytes",
                ));
            }
        }
    }
    let mut cookie = [0u8; 8];
    if let Some(off) = len.checked_sub(511) {
        if read(off, &mut cookie)? && &cookie == super::footer::COOKIE {
            return Ok(Some("a 511-byte VHD footer at the end"));
        }
    }
    if read(0, &mut sector)? {
        if &sector[..8] == super::footer::COOKIE {
            return Ok(Some("a VHD footer copy (conectix) at offset 0"));
        }
        if footer_like(&sector) {
            return Ok(Some("a VHD footer copy with a damaged cookie at offset 0"));
        }
    }
    if read(512, &mut cookie)? && &cookie == super::header::COOKIE {
        return Ok(Some("a VHD dynamic header cookie (cxsparse) at offset 512"));
    }
    Ok(None)
}

/// Whether `sector` is a VHD footer whose cookie is damaged: a cookie at
/// most two bytes off `conectix`, or the footer's file format version
/// with a VHD disk type, or a checksum field that holds the sector's
/// checksum. Other data matches only by accident (1 in 2^32 or less; an
/// all-zero sector matches none).
fn footer_like(sector: &[u8; 512]) -> bool {
    let cookie_off = sector[..8]
        .iter()
        .zip(super::footer::COOKIE)
        .filter(|(a, b)| a != b)
        .count();
    let version_and_type = be32(sector, OFF_VERSION) == FILE_FORMAT_VERSION
        && (2..=4).contains(&be32(sector, OFF_TYPE));
    cookie_off <= 2
        || version_and_type
        || be32(sector, OFF_CHECKSUM) == checksum(sector, OFF_CHECKSUM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::footer::{DiskType, Footer};

    fn file(bytes: &[u8]) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0).unwrap();
        f
    }

    #[test]
    fn probe_plain_data_shows_no_sign() {
        assert_eq!(vhd_sign(&file(&[0u8; 4096])).unwrap(), None);
        assert_eq!(vhd_sign(&file(&[0x5a; 1000])).unwrap(), None);
        assert_eq!(vhd_sign(&file(&[])).unwrap(), None);
    }

    #[test]
    fn probe_damaged_footer_cookie_is_still_a_vhd_sign() {
        let footer = Footer::new(DiskType::Fixed, 4096, [7; 16], 0).to_bytes();
        let mut img = vec![0u8; 4096];
        img.extend_from_slice(&footer);
        assert!(vhd_sign(&file(&img)).unwrap().unwrap().contains("conectix"));
        let n = img.len();
        // Any damage to the cookie: a byte, or all of it (which also
        // breaks the checksum).
        img[n - 512] = b'X';
        assert!(vhd_sign(&file(&img))
            .unwrap()
            .unwrap()
            .contains("damaged cookie"));
        img[n - 512..n - 504].copy_from_slice(b"\0\0\0\0\0\0\0\0");
        assert!(vhd_sign(&file(&img))
            .unwrap()
            .unwrap()
            .contains("damaged cookie"));
    }

    #[test]
    fn probe_footer_copy_or_sparse_header_at_the_start_is_a_vhd_sign() {
        let footer = Footer::new(DiskType::Dynamic, 4096, [7; 16], 0).to_bytes();
        let mut img = footer.to_vec();
        img.resize(8192, 0);
        assert!(vhd_sign(&file(&img)).unwrap().unwrap().contains("offset 0"));
        let mut img = vec![0u8; 8192];
        img[512..520].copy_from_slice(b"cxsparse");
        assert!(vhd_sign(&file(&img)).unwrap().unwrap().contains("cxsparse"));
    }
}
