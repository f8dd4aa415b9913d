//! The flags XAPI's storage manager (`sm`, `drivers/blktap2.py`, class
//! `TapCtl`) passes to tap-ctl beyond the basic lifecycle, as one options
//! record carried by [`crate::proto::Request::WithOptions`].
//!
//! A request without any of them is sent as the plain request, so the
//! broker's ordinary path is untouched; every flag that is named here is
//! either carried out with blktap's meaning or refused, by the broker, with
//! an audited [`crate::proto::ErrorKind::Unsupported`] that names it.

use crate::Minor;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest `-t SECS` accepted (blktap takes any int; a day is plenty).
pub const MAX_TIMEOUT_SECS: u32 = 86_400;

/// blktap's own device directory (`/dev/xen/blktap-2/tapdevN`), accepted by
/// `allocate -d` next to the broker's `device_dir`.
pub const BLKTAP_DEVICE_DIR: &str = "/dev/xen/blktap-2";

/// What SM may add to `open`, `close`, `pause`, `unpause` and `allocate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// `-t SECS`: the tapdisk must answer within this; otherwise the command
    /// fails with "timed out" and the minor keeps a state `list` shows.
    pub timeout_secs: Option<u32>,
    /// `open -D`: the images are opened without `O_DIRECT` (page cache).
    pub no_o_direct: bool,
    /// `open -e MINOR`: the image's parent chain is the one MINOR serves.
    pub existing_parent: Option<Minor>,
    /// `allocate -d DEVPATH`: the minor that device path names.
    pub device: Option<String>,
    /// `open -C LOG` / `unpause -c LOG`: track changed blocks into LOG,
    /// a blktap CBT log (see [`crate::cbt`]).
    pub cbt_log: Option<String>,
    /// `open -2 URI [-s]`, `unpause -2 URI`: mirror writes to a secondary
    /// (see [`crate::mirror`]).
    pub mirror: Option<crate::mirror::MirrorRequest>,
    /// Flags that were given but that tapjail does not build (yet).
    pub unbuilt: Vec<Unbuilt>,
    /// `open -r`: serve the image as a local read cache of its parent
    /// chain (blktap's IntelliCache, see [`crate::read_cache`]).
    #[serde(default)]
    pub read_cache: bool,
    /// `open -E`: the key for blktap's encrypted VHDs, read by tap-ctl
    /// from stdin. Never printed (see [`crate::secret`]); the broker keeps
    /// it for the disk's life and gives it to that disk's worker only.
    #[serde(default)]
    pub encryption_key: Option<crate::secret::Secret>,
}

impl Options {
    /// Whether nothing beyond the plain request was asked for.
    pub fn is_empty(&self) -> bool {
        *self == Options::default()
    }
}

/// Which files of a chain a worker opens through the page cache (no
/// `O_DIRECT`); see `tapjail_common::worker_proto::ToWorker::Cache`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePlan {
    /// `-D`: the leaf (and, with it, every parent).
    pub leaf_buffered: bool,
    /// `-e MINOR`: the shared parents, so clones read them once.
    pub parents_buffered: bool,
    /// `-r`: the leaf is a read cache of its parent chain, filled by reads
    /// and never written by the guest (see [`crate::read_cache`]).
    #[serde(default)]
    pub read_cache: bool,
    /// `-r` on a leaf with `-e` of a read cache (blktap's lcache in leaf
    /// mode): reads from below the leaf are written back into it.
    #[serde(default)]
    pub leaf_fill: bool,
}

/// A blktap feature SM can ask for that tapjail refuses instead of faking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unbuilt {
    /// `open -r` before tapjail built it; no longer sent by tap-ctl
    /// (see [`Options::read_cache`]), kept so an old client's request
    /// still decodes and is refused with its name.
    ReadCache,
    /// `open -E`: the key for blktap's encrypted VHDs (never carried here:
    /// tap-ctl does not read it when the feature is refused).
    Encryption,
}

impl Unbuilt {
    /// The flag as SM passes it.
    pub fn flag(&self) -> &'static str {
        match self {
            Unbuilt::ReadCache => "-r",
            Unbuilt::Encryption => "-E",
        }
    }
}

impl fmt::Display for Unbuilt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unbuilt::ReadCache => {
                f.write_str("-r (IntelliCache local read cache of the parent chain)")
            }
            Unbuilt::Encryption => f.write_str("-E (blktap encrypted VHD, key on stdin)"),
        }
    }
}

/// Why a device path given to `allocate -d` names no minor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevicePathError {
    #[error(
        "{path:?} is not a tapjail device path: use {dir}/tapdevN or {BLKTAP_DEVICE_DIR}/tapdevN"
    )]
    NotOurs { path: String, dir: String },
    #[error("{path:?}: {why}")]
    BadMinor { path: String, why: String },
}

/// The minor `path` names: `DIR/tapdevN` with DIR the broker's
/// `device_dir` or blktap's `/dev/xen/blktap-2`, N in decimal without
/// leading zeros (so one minor has one name).
pub fn minor_of_device(path: &str, device_dir: &std::path::Path) -> Result<Minor, DevicePathError> {
    let own = device_dir.display().to_string();
    let own = own.trim_end_matches('/');
    let rest = [own, BLKTAP_DEVICE_DIR]
        .iter()
        .find_map(|dir| path.strip_prefix(dir)?.strip_prefix("/tapdev"))
        .ok_or_else(|| DevicePathError::NotOurs {
            path: path.to_string(),
            dir: own.to_string(),
        })?;
    let bad = |why: String| DevicePathError::BadMinor {
        path: path.to_string(),
        why,
    };
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || (rest.len() > 1 && rest.starts_with('0'))
    {
        return Err(bad(format!("{rest:?} is not a minor number")));
    }
    let n: u64 = rest.parse().map_err(|_| bad("minor out of range".into()))?;
    Minor::new(n).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn device_paths_of_ours_and_blktaps_form_name_their_minor() {
        let dir = Path::new("/dev/tapjail");
        assert_eq!(
            minor_of_device("/dev/tapjail/tapdev7", dir).unwrap().get(),
            7
        );
        assert_eq!(
            minor_of_device("/dev/xen/blktap-2/tapdev12", dir)
                .unwrap()
                .get(),
            12
        );
        assert_eq!(
            minor_of_device("/run/x/tapdev3", Path::new("/run/x/"))
                .unwrap()
                .get(),
            3
        );
    }

    #[test]
    fn device_paths_elsewhere_or_malformed_are_refused() {
        let dir = Path::new("/dev/tapjail");
        for p in [
            "/dev/sda",
            "/dev/tapjail/tapdev",
            "/dev/tapjail/tapdev07",
            "/dev/tapjail/tapdev-1",
            "/dev/tapjail/tapdev1/../tapdev2",
            "/dev/tapjail/../tapjail/tapdev1",
            "/dev/tapjail/tapdev99999999999999999999",
            "/dev/tapjail/tapdev16384",
            "dev/tapjail/tapdev1",
        ] {
            assert!(minor_of_device(p, dir).is_err(), "{p}");
        }
    }
}
