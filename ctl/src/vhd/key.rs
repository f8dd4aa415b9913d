//! `tap-ctl vhd key`: blktap's `vhd-util key` (set, print, check or
//! calculate the keyhash of an encrypted VHD). The key comes from a file
//! (`-k`, as vhd-util) or from stdin (`-k -`), is read before the confined
//! child starts and never printed; `-p` prints the nonce and hash only.

use std::io::Read;
use std::path::Path;
use tapjail_common::secret::Secret;
use tapjail_ctl::files::Paths;
use tapjail_image::vhd::crypt::{Keyhash, NONCE_BYTES};
use tapjail_image::vhd::keyhash;
use tapjail_image::ImageError;

/// What `vhd key` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    Set,
    Check,
    Print,
}

/// Read a key file (or stdin for `-`): 32 or 64 bytes, as blktap takes.
pub fn read_key_file(path: &Path) -> anyhow::Result<Secret> {
    let key = if path == Path::new("-") {
        crate::xapi::read_key(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("-k {}: {e}; nothing was changed", path.display()))?;
        crate::xapi::read_key(f.take(1024))
    };
    key.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parse `-N NONCE` (64 hex digits).
pub fn parse_nonce(hex: &str) -> anyhow::Result<[u8; NONCE_BYTES]> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    match bytes {
        Some(b) if b.len() == NONCE_BYTES && hex.len() == 2 * NONCE_BYTES => {
            let mut n = [0u8; NONCE_BYTES];
            n.copy_from_slice(&b);
            Ok(n)
        }
        _ => anyhow::bail!("-N: the nonce must be {} hex digits", 2 * NONCE_BYTES),
    }
}

/// The confined part: open `name` and do `op`. Prints for `Print`.
pub fn run_in<P: Paths + ?Sized>(
    paths: &mut P,
    name: &Path,
    op: KeyOp,
    key: Option<&Secret>,
    nonce: Option<[u8; NONCE_BYTES]>,
) -> Result<String, ImageError> {
    let f = paths.open(name, op == KeyOp::Set)?;
    let shown = name.display().to_string();
    match op {
        KeyOp::Set => {
            let key = key.ok_or_else(|| ImageError::InvalidArgument("-s needs -k".into()))?;
            let kh = keyhash::make(key, nonce)?;
            keyhash::set(&f, &shown, &kh)?;
            Ok(String::new())
        }
        KeyOp::Check => {
            let key = key.ok_or_else(|| ImageError::InvalidArgument("-c needs -k".into()))?;
            let kh = keyhash::get(&f)?.ok_or_else(|| {
                ImageError::InvalidArgument(format!("{shown}: this vhd has no keyhash"))
            })?;
            if kh.matches(key.expose()) {
                Ok(String::new())
            } else {
                Err(ImageError::InvalidArgument(format!(
                    "{shown}: the vhd's keyhash does not match the key"
                )))
            }
        }
        KeyOp::Print => Ok(match keyhash::get(&f)? {
            None => "none\n".into(),
            Some(Keyhash { nonce, hash }) => {
                format!("{} {}\n", keyhash::hex(&nonce), keyhash::hex(&hash))
            }
        }),
    }
}
