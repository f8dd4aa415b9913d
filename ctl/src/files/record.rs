//! What a child records about its parent (UUID, time stamp, name,
//! locators), and the path arithmetic the locators need.

use super::{Local, Paths};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use tapjail_image::vhd::create::ParentSpec;
use tapjail_image::vhd::layer::{VhdLayer, VhdOptions};
use tapjail_image::vhd::locator::LocatorCode;
use tapjail_image::ImageError;

/// What a child of `parent` (to be created at `child`) records about it:
/// UUID, modification time, file name, and locators: `W2ru` with the path
/// relative to the child's directory (`./base.vhd`, what blktap resolves),
/// then `W2ku` and `MacX` with the absolute path. Also the parent's
/// virtual size.
pub fn parent_spec(child: &Path, parent: &Path) -> Result<(ParentSpec, u64), ImageError> {
    parent_spec_in(&mut Local::default(), child, parent)
}

/// [`parent_spec`] through `paths`.
pub fn parent_spec_in<P: Paths + ?Sized>(
    paths: &mut P,
    child: &Path,
    parent: &Path,
) -> Result<(ParentSpec, u64), ImageError> {
    let pf = paths.open(parent, false)?;
    let mut spec = parent_record(child, parent, &pf)?;
    let layer = VhdLayer::open(
        Box::new(pf),
        &parent.to_string_lossy(),
        true,
        VhdOptions::default(),
    )?;
    spec.uuid = layer.uuid();
    Ok((spec, layer.virtual_size()))
}

/// What a child records about `parent` (open as `pf`) apart from its UUID,
/// which is left null (as for a raw parent): timestamp, name, locators.
pub fn parent_record(child: &Path, parent: &Path, pf: &File) -> Result<ParentSpec, ImageError> {
    let mtime = pf
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| {
            d.as_secs()
                .saturating_sub(tapjail_image::vhd::footer::VHD_EPOCH)
        })
        .unwrap_or(0);
    let abs = normalize(&std::path::absolute(parent).map_err(ImageError::io("resolve path", 0))?);
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rel = relative_path(child_dir, &abs)?;
    let abs_s = abs.to_string_lossy().into_owned();
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ParentSpec {
        uuid: [0; 16],
        timestamp: u32::try_from(mtime).unwrap_or(u32::MAX),
        name,
        locators: vec![
            (LocatorCode::W2ru, rel),
            (LocatorCode::W2ku, abs_s.clone()),
            (LocatorCode::MacX, abs_s),
        ],
    })
}

/// Whether `parent` lies outside the directory tree of `child` (its
/// relative locator starts with `..`), so that the offline tools will
/// follow it only when named with `--parent`.
pub fn parent_outside(child: &Path, parent: &Path) -> bool {
    let dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    relative_path(dir, parent).is_ok_and(|r| r.starts_with(".."))
}

/// Refuse making `child` its own parent (both exist and are one file).
pub fn not_own_parent(child: &Path, parent: &Path) -> Result<(), ImageError> {
    if let (Ok(a), Ok(b)) = (child.canonicalize(), parent.canonicalize()) {
        if a == b {
            return Err(ImageError::InvalidArgument(format!(
                "{} cannot be its own parent",
                child.display()
            )));
        }
    }
    Ok(())
}

/// The path of `target` relative to the directory `from_dir` (both made
/// absolute first), in the `./x` / `../x` form blktap writes.
pub fn relative_path(from_dir: &Path, target: &Path) -> Result<String, ImageError> {
    let abs = |p: &Path| -> Result<PathBuf, ImageError> {
        let p = std::path::absolute(p).map_err(ImageError::io("resolve path", 0))?;
        Ok(normalize(&p))
    };
    let from = abs(from_dir)?;
    let to = abs(target)?;
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..f.len() {
        parts.push("..".into());
    }
    for c in &t[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let rel = parts.join("/");
    Ok(if rel.starts_with("..") {
        rel
    } else {
        format!("./{rel}")
    })
}

/// Lexically remove `.` and `..` components of an absolute path.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}
