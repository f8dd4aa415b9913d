//! Lexical path checks. No syscalls: whether a path stays inside a root on
//! the real filesystem is enforced by the broker's `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`) relative
//! to the root; here we only decide which root a path claims to be under
//! and refuse paths that try to climb out by name.

use std::path::{Component, Path, PathBuf};

/// Longest path we accept from a client or a locator.
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not absolute")]
    NotAbsolute,
    #[error("path contains a '..' component")]
    DotDot,
    #[error("path climbs above /")]
    AboveRoot,
    #[error("path is empty")]
    Empty,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("path contains a NUL byte")]
    Nul,
}

fn basic(path: &Path) -> Result<(), PathError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul);
    }
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute);
    }
    Ok(())
}

/// An absolute path with `.` and repeated or trailing `/` removed; any
/// `..` is refused (clients must name images directly).
pub fn normalize_absolute(path: &Path) -> Result<PathBuf, PathError> {
    basic(path)?;
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(PathError::DotDot),
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return Err(PathError::NotAbsolute),
        }
    }
    Ok(out)
}

/// Like [`normalize_absolute`] but `..` removes the previous component, as
/// VHD parent locators such as `../base.vhd` need. Safe only because the
/// result is then opened with `RESOLVE_NO_SYMLINKS`, so no component that
/// was removed here could have been a symlink leading elsewhere.
pub fn normalize_lexically(path: &Path) -> Result<PathBuf, PathError> {
    basic(path)?;
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            Component::Normal(n) => parts.push(n),
            Component::Prefix(_) => return Err(PathError::NotAbsolute),
        }
    }
    let mut out = PathBuf::from("/");
    out.extend(parts);
    Ok(out)
}

/// The root (from `roots`, all normalized) that `path` (normalized) lies
/// strictly below, the longest if several, with the rest of the path.
pub fn under_root<'a>(path: &Path, roots: &'a [PathBuf]) -> Option<(&'a Path, PathBuf)> {
    roots
        .iter()
        .filter_map(|r| {
            let rest = path.strip_prefix(r).ok()?;
            if rest.as_os_str().is_empty() {
                None
            } else {
                Some((r.as_path(), rest.to_path_buf()))
            }
        })
        .max_by_key(|(r, _)| r.as_os_str().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_absolute_cleans_and_refuses_dotdot() {
        assert_eq!(
            normalize_absolute(Path::new("/srv//a/./b/")).unwrap(),
            Path::new("/srv/a/b")
        );
        assert_eq!(
            normalize_absolute(Path::new("/srv/a/../b")),
            Err(PathError::DotDot)
        );
        assert_eq!(
            normalize_absolute(Path::new("srv/a")),
            Err(PathError::NotAbsolute)
        );
        assert_eq!(normalize_absolute(Path::new("")), Err(PathError::Empty));
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(
            normalize_absolute(Path::new(&long)),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn normalize_lexically_resolves_dotdot_but_not_above_root() {
        assert_eq!(
            normalize_lexically(Path::new("/srv/a/vms/../base.vhd")).unwrap(),
            Path::new("/srv/a/base.vhd")
        );
        assert_eq!(
            normalize_lexically(Path::new("/srv/../../etc")),
            Err(PathError::AboveRoot)
        );
        assert_eq!(
            normalize_lexically(Path::new("/srv/a/../../etc/shadow")).unwrap(),
            Path::new("/etc/shadow")
        );
    }

    #[test]
    fn under_root_needs_a_component_boundary_and_a_rest() {
        let roots = vec![PathBuf::from("/srv/a"), PathBuf::from("/srv/a/deep")];
        assert!(under_root(Path::new("/srv/ab/x"), &roots).is_none());
        assert!(under_root(Path::new("/srv/a"), &roots).is_none());
        let (r, rest) = under_root(Path::new("/srv/a/x.vhd"), &roots).unwrap();
        assert_eq!(
            (r, rest.as_path()),
            (Path::new("/srv/a"), Path::new("x.vhd"))
        );
        let (r, rest) = under_root(Path::new("/srv/a/deep/y"), &roots).unwrap();
        assert_eq!(
            (r, rest.as_path()),
            (Path::new("/srv/a/deep"), Path::new("y"))
        );
    }
}
