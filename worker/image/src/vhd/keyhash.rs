//! `vhd-util key` offline: read, set and check the keyhash blktap keeps in
//! the batmap header ([`super::crypt`]). As blktap: fixed images cannot
//! carry one (no batmap), and a keyhash is set only on an image with no
//! allocated block (data already there would be plaintext).

use super::crypt::{Keyhash, NONCE_BYTES};
use super::layout::{BatmapState, Metadata};
use crate::{Backing, ImageError};
use tapjail_common::secret::Secret;

/// The keyhash of the image in `file`, if set.
pub fn get(file: &dyn Backing) -> Result<Option<Keyhash>, ImageError> {
    let meta = Metadata::read(file)?;
    Ok(meta.sparse.and_then(|s| s.keyhash))
}

/// Set the keyhash of the (empty, dynamic or differencing) image in
/// `file` to `keyhash`.
pub fn set(file: &dyn Backing, name: &str, keyhash: &Keyhash) -> Result<(), ImageError> {
    let meta = Metadata::read(file)?;
    let bad = |why: &str| ImageError::InvalidArgument(format!("{name}: {why}"));
    let Some(s) = meta.sparse else {
        return Err(bad(
            "a fixed VHD has no batmap to hold a keyhash (blktap: can't save key hashes for fixed vhds)",
        ));
    };
    if s.bat.iter().any(|&e| e != super::bat::UNUSED) {
        return Err(bad(
            "it has allocated blocks, which would stay plaintext; set the key on a new, empty image",
        ));
    }
    if !matches!(s.batmap, BatmapState::Valid { .. }) {
        return Err(bad(
            "it has no valid batmap header to hold the keyhash; create it with tap-ctl vhd create",
        ));
    }
    let off = s.batmap_header_offset;
    let mut sector = [0u8; 512];
    file.read_exact_at(&mut sector, off)
        .map_err(ImageError::io("read batmap header", off))?;
    keyhash.store(&mut sector);
    file.write_all_at(&sector, off)
        .map_err(ImageError::io("write batmap header", off))?;
    file.sync_data().map_err(ImageError::io("fsync", off))
}

/// A keyhash for `key` with a fresh random nonce (or `nonce`).
pub fn make(key: &Secret, nonce: Option<[u8; NONCE_BYTES]>) -> Result<Keyhash, ImageError> {
    super::crypt::SectorCipher::new(key.expose())?;
    let nonce = match nonce {
        Some(n) => n,
        None => {
            let mut n = [0u8; NONCE_BYTES];
            getrandom::fill(&mut n).map_err(|e| {
                ImageError::InvalidArgument(format!("no randomness for the nonce: {e}"))
            })?;
            n
        }
    };
    Ok(Keyhash::compute(nonce, key.expose()))
}

/// Lower-case hex, as `vhd-util key -p` prints.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
