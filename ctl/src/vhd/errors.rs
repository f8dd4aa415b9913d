//! Engine errors turned into messages that name the file and say what
//! to do.

use super::ENOSPC;
use anyhow::Result;
use std::path::Path;
use tapjail_image::ImageError;

/// What to tell the user to do about an engine error on `path`.
pub(super) fn hint(e: &ImageError, path: &Path) -> String {
    let p = path.display();
    match e {
        ImageError::Corrupt {
            field: "footer.cookie" | "footer",
            ..
        } => format!("{p} is not a VHD image (no VHD footer found), or its footer is destroyed"),
        ImageError::Corrupt { .. } => format!(
            "{p} is damaged: run `tap-ctl vhd check -n {p}` to list the problems and \
             `tap-ctl vhd repair -n {p}` to fix what can be fixed"
        ),
        ImageError::Parent(_) | ImageError::ParentUuidMismatch { .. } => format!(
            "the parent of {p} is missing, wrong, or not where tap-ctl looks: put it back, \
             name it with --parent PARENT, or point the image at the right one with \
             `tap-ctl vhd set-parent -n {p} -p PARENT`"
        ),
        ImageError::ParentLoop { .. } | ImageError::ChainTooDeep { .. } => {
            format!("the parent chain of {p} is broken; fix it with `tap-ctl vhd set-parent`")
        }
        ImageError::Io {
            op: "create",
            source,
            ..
        } if source.kind() == std::io::ErrorKind::NotFound => format!(
            "{p} cannot be created: its directory does not exist; create the directory first \
             or give another path"
        ),
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => format!(
            "{p} does not exist: check the path (a relative one starts at the current directory)"
        ),
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            format!(
                "you may not access {p}: check its permissions and its directories', or run \
                 as a user who may"
            )
        }
        ImageError::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
            format!("the filesystem holding {p} is full: free some space and run the command again")
        }
        _ => format!("while working on {p}"),
    }
}

/// Attach the file name and a hint to an engine result.
pub(super) fn on<T>(path: &Path, r: Result<T, ImageError>) -> Result<T> {
    r.map_err(|e| explain(path, e))
}

/// An engine error on `path`, with the file name and a hint.
pub(super) fn explain(path: &Path, e: ImageError) -> anyhow::Error {
    match e {
        // Says what is wrong and what to do; only the file may be missing.
        ImageError::InvalidArgument(ref m) if m.contains(&*path.to_string_lossy()) => {
            anyhow::Error::new(e)
        }
        ImageError::InvalidArgument(_) => {
            let p = path.display().to_string();
            anyhow::Error::new(e).context(p)
        }
        e => {
            let h = hint(&e, path);
            with_hint(e, h)
        }
    }
}

/// `e` under the hint `h`. A parent error's message is used without the
/// engine's "parent image:" prefix: the hint already names the parent.
pub(super) fn with_hint(e: ImageError, h: String) -> anyhow::Error {
    match e {
        ImageError::Parent(m) => anyhow::anyhow!("{h}: {m}"),
        e => anyhow::Error::new(e).context(h),
    }
}
