//! Write mirroring to a secondary (`tap-ctl open -2 URI [-s]`,
//! `unpause -2 URI`), with blktap's URI forms and meanings.
//!
//! blktap parses the secondary as any image (`tapdisk_disktype_parse_params`):
//! `vhd:PATH` and `aio:PATH` name a *file* secondary, which SM's IntelliCache
//! leaf call passes (the VM's VDI on the shared SR, see
//! `tapjail_common::mirror::MirrorTarget::File`); the broker opens it like
//! any writable image of the tenant.
//!
//! blktap's tapdisk takes `nbd:` followed by either the path of a unix
//! socket or `IPV4:PORT` (`drivers/block-nbd.c`); anything else is there
//! the name of an fd passed beforehand with `tap-ctl`'s fd receiver, which
//! tapjail has no use for (the broker connects), so it is refused with a
//! message. qemu's spelling `nbd:unix:/path` is accepted as the same unix
//! form. The broker parses the URI (policy input, not untrusted bytes);
//! the worker never sees more than the connected socket and the URI text.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Longest URI accepted (blktap's message field holds 256 bytes).
pub const MAX_URI_LEN: usize = 256;

/// `-2 URI` and `-s` as sent with `open` or `unpause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRequest {
    pub uri: String,
    /// `-s`: blktap's standby mode (see [`MirrorMode::Standby`]).
    pub standby: bool,
}

/// Where a secondary lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorTarget {
    /// `nbd:/path/to/socket` (or qemu's `nbd:unix:/path`).
    Unix(PathBuf),
    /// `nbd:IPV4:PORT`.
    Tcp(Ipv4Addr, u16),
    /// `vhd:PATH` or `aio:PATH`: an image file, opened by the broker as a
    /// writable image of the tenant. In mirror mode it is also read, right
    /// below the leaf (blktap: it "may already contain data").
    File(crate::proto::ImageKind, PathBuf),
}

/// blktap's two secondary modes (`TD_VBD_SECONDARY_MIRROR` / `_STANDBY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorMode {
    /// Every guest write goes to the primary and the secondary and is
    /// acknowledged when both have it; a background copy brings the
    /// secondary in sync with what the primary held before.
    Mirror,
    /// The secondary is connected and checked (same size) but written only
    /// once the primary runs out of space (ENOSPC): from then on every
    /// request is served by the secondary. No copy is made.
    Standby,
}

impl MirrorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorMode::Mirror => "mirror",
            MirrorMode::Standby => "standby",
        }
    }
}

/// Why a `-2` URI names no target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error(
        "-2 {uri:?}: a secondary is nbd:/path/to/socket, nbd:IPV4:PORT, vhd:/path/to/file.vhd \
         or aio:/path/to/file"
    )]
    NotNbd { uri: String },
    #[error("-2 {uri:?}: longer than {MAX_URI_LEN} bytes")]
    TooLong { uri: String },
    #[error("-2 {uri:?}: {path:?} must be an absolute socket path without '.' or '..' components")]
    BadPath { uri: String, path: String },
    #[error(
        "-2 {uri:?}: neither a socket path nor IPV4:PORT (blktap's passed-fd names are not \
         supported: the broker connects, give nbd:/path/to/socket or nbd:IPV4:PORT)"
    )]
    Unrecognised { uri: String },
}

impl MirrorTarget {
    /// Parse blktap's `-2` argument.
    pub fn parse(uri: &str) -> Result<MirrorTarget, UriError> {
        if uri.len() > MAX_URI_LEN {
            return Err(UriError::TooLong { uri: clip(uri) });
        }
        for (prefix, kind) in [
            ("vhd:", crate::proto::ImageKind::Vhd),
            ("aio:", crate::proto::ImageKind::Aio),
        ] {
            if let Some(path) = uri.strip_prefix(prefix) {
                return Ok(MirrorTarget::File(kind, clean_path(uri, path)?));
            }
        }
        let Some(rest) = uri.strip_prefix("nbd:") else {
            return Err(UriError::NotNbd { uri: uri.into() });
        };
        let rest = rest.strip_prefix("unix:").unwrap_or(rest);
        if rest.starts_with('/') {
            return Ok(MirrorTarget::Unix(clean_path(uri, rest)?));
        }
        let bad = || UriError::Unrecognised { uri: uri.into() };
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let ip: Ipv4Addr = host.parse().map_err(|_| bad())?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(MirrorTarget::Tcp(ip, port))
    }
}

impl fmt::Display for MirrorTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MirrorTarget::Unix(p) => write!(f, "nbd:{}", p.display()),
            MirrorTarget::Tcp(ip, port) => write!(f, "nbd:{ip}:{port}"),
            MirrorTarget::File(kind, p) => write!(f, "{kind}:{}", p.display()),
        }
    }
}

/// `path` as a secondary's path: absolute, without `.`, `..` or empty
/// components (checked on the text: `Path::components` drops `.` and `//`).
fn clean_path(uri: &str, path: &str) -> Result<PathBuf, UriError> {
    let clean = path.strip_prefix('/').is_some_and(|below_root| {
        below_root
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
    });
    if !clean || path.contains('\0') {
        return Err(UriError::BadPath {
            uri: uri.into(),
            path: path.into(),
        });
    }
    Ok(Path::new(path).to_path_buf())
}

fn clip(s: &str) -> String {
    let mut end = 64.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Where a mirror stands, for `tap-ctl stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorState {
    /// The background copy is running; guest writes are mirrored.
    Copying,
    /// The secondary holds everything the primary does.
    Synced,
    /// A file secondary (`-2 vhd:PATH`): every write goes to both, and
    /// the secondary is read below the leaf; no copy is made (it holds the
    /// disk's earlier data itself, as blktap assumes).
    Mirroring,
    /// Standby: connected, not written.
    Standby,
    /// Standby after the primary ran out of space: served by the secondary.
    /// A file secondary in mirror mode says so too once its leaf ran out
    /// of space: the leaf is retired and the secondary serves alone.
    FailedOver,
    /// The secondary failed or went away: mirroring stopped, the primary
    /// keeps serving (blktap's `nbd_mirror_failed`).
    Failed,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Copying => "copying",
            MirrorState::Synced => "synced",
            MirrorState::Mirroring => "mirroring",
            MirrorState::Standby => "standby",
            MirrorState::FailedOver => "failed-over",
            MirrorState::Failed => "failed",
        }
    }
}

/// What the broker's record says of a minor's `-2` mirror, for `tap-ctl
/// list`: where to and how, or why it was lost. The live state (copying,
/// synced, ...) is the worker's, read with `stats` (see [`MirrorStats`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRecord {
    pub uri: String,
    pub mode: MirrorMode,
    /// Set when a respawn or unpause could not re-establish it: why.
    pub lost: Option<String>,
}

/// A worker's mirror, as `tap-ctl stats` shows it under `mirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStats {
    pub uri: String,
    pub mode: MirrorMode,
    pub state: MirrorState,
    /// Bytes the background copy has brought over, of `total`.
    pub copied: u64,
    pub total: u64,
    /// Guest writes that went to both sides.
    pub mirrored_writes: u64,
    /// Why the mirror failed (when `state` is `Failed`).
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blktaps_uri_forms_parse() {
        assert_eq!(
            MirrorTarget::parse("nbd:/run/sm/nbd/x.sock").unwrap(),
            MirrorTarget::Unix("/run/sm/nbd/x.sock".into())
        );
        assert_eq!(
            MirrorTarget::parse("nbd:unix:/run/x").unwrap(),
            MirrorTarget::Unix("/run/x".into())
        );
        assert_eq!(
            MirrorTarget::parse("nbd:10.0.0.5:10809").unwrap(),
            MirrorTarget::Tcp(Ipv4Addr::new(10, 0, 0, 5), 10809)
        );
        assert_eq!(
            MirrorTarget::parse("nbd:10.0.0.5:10809")
                .unwrap()
                .to_string(),
            "nbd:10.0.0.5:10809"
        );
    }

    /// SM's IntelliCache leaf call mirrors to the VDI's file on the shared SR.
    #[test]
    fn file_secondaries_parse_with_their_kind() {
        use crate::proto::ImageKind;
        let t = MirrorTarget::parse("vhd:/srv/shared/vdi.vhd").unwrap();
        assert_eq!(
            t,
            MirrorTarget::File(ImageKind::Vhd, "/srv/shared/vdi.vhd".into())
        );
        assert_eq!(t.to_string(), "vhd:/srv/shared/vdi.vhd");
        assert_eq!(
            MirrorTarget::parse("aio:/srv/x.raw").unwrap(),
            MirrorTarget::File(ImageKind::Aio, "/srv/x.raw".into())
        );
    }

    #[test]
    fn other_uris_are_refused_with_the_forms_named() {
        for bad in [
            "/run/x.sock",
            "qcow2:/x",
            "nbd:",
            "nbd:fdname",
            "nbd:host.example:10809",
            "nbd:10.0.0.5",
            "nbd:10.0.0.5:",
            "nbd:10.0.0.5:0",
            "nbd:10.0.0.5:70000",
            "nbd:10.0.0.5:+80",
            "nbd:/run/../etc/x",
            "nbd:/run/./x",
            "nbd:/run/x/",
            "nbd:/run//x",
            "nbd:/",
            "nbd:unix:relative",
        ] {
            let e = MirrorTarget::parse(bad).unwrap_err();
            assert!(e.to_string().contains("nbd:"), "{bad}: {e}");
        }
        for bad in [
            "vhd:relative.vhd",
            "vhd:/a/../b.vhd",
            "aio:/a//b",
            "vhd:",
            "aio:/a/",
        ] {
            let e = MirrorTarget::parse(bad).unwrap_err();
            assert!(matches!(e, UriError::BadPath { .. }), "{bad}: {e}");
        }
        assert!(matches!(
            MirrorTarget::parse(&format!("nbd:/{}", "a".repeat(300))),
            Err(UriError::TooLong { .. })
        ));
    }
}
