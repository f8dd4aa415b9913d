//! The offline tools' file handling: opening images by path, creating new
//! files, and finding the parents of a differencing image. The engine
//! (`tapjail-image`) never opens a path; `tap-ctl vhd` does it here.
//!
//! Every operation goes through [`Paths`], so that the same code runs
//! unconfined ([`Local`], as tests and the privsep parent use it) and in
//! the confined image parser, where each file is asked for over a socket
//! ([`crate::privsep`]).
//!
//! # Which parent is followed
//! A differencing image names its parent in locators that come out of the
//! (untrusted) image. Only *relative* locators are followed, only to a
//! file beneath the child's own directory, and through no symbolic link
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): an image
//! cannot make a tool run as root read `/etc/shadow` into a conversion,
//! nor coalesce into a file elsewhere. Absolute locators are ignored. A
//! parent anywhere else is used only when the user names it
//! (`--parent PATH`).

mod convert;
mod locate;
mod open;
mod record;
mod tools;

pub use convert::*;
use locate::{dir_of, open_dir};
pub use locate::{locate_beneath, open_parent_via};
pub use open::*;
pub use record::*;
pub use tools::*;

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use tapjail_image::{Backing, ImageError, ParentLocator, ParentOpener};

/// The rule, said where a parent is refused or not found.
pub const PARENT_RULE: &str = "tap-ctl follows only relative parent locators to a file beneath \
     the image's own directory, through no symbolic link; name the parent with --parent PATH";

/// How the offline tools get at files. Each method is one request the
/// confined parser may make of its unconfined parent.
pub trait Paths {
    /// Open a file named on the command line (read-write if `write`).
    fn open(&mut self, path: &Path, write: bool) -> Result<File, ImageError>;
    /// Create the new file `path` (it must not exist yet).
    fn create(&mut self, path: &Path) -> Result<File, ImageError>;
    /// Remove a file this tool created (after a failed fill).
    fn remove(&mut self, path: &Path);
    /// The parent of `child` named on the command line, if one was.
    fn named_parent(
        &mut self,
        child: &str,
        write: bool,
    ) -> Option<Result<(File, String), ImageError>>;
    /// Open the file one locator of `child` names, under the rule of this
    /// module. Returns the file and the name it was opened under.
    fn locate(
        &mut self,
        child: &str,
        locator: &ParentLocator,
        write: bool,
    ) -> Result<(File, String), ImageError>;
}

/// The directories of the layers opened so far, each pinned (an `O_PATH`
/// fd) when its layer was opened: a layer's parents are looked for in the
/// directory it was opened from, even if someone renames or replaces that
/// directory's path meanwhile.
#[derive(Debug, Default)]
pub struct Dirs(Vec<(String, OwnedFd)>);

impl Dirs {
    /// The pinned directory of the layer opened as `name`.
    pub fn get(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_fd())
    }

    /// Remember `dir` as the directory of `name` (the first one stays).
    pub fn insert(&mut self, name: &str, dir: OwnedFd) {
        if self.get(name).is_none() {
            self.0.push((name.to_string(), dir));
        }
    }
}

/// Direct, unconfined access to the filesystem.
#[derive(Debug, Default)]
pub struct Local {
    /// Parents named by the user: (child name, parent path).
    named: Vec<(String, PathBuf)>,
    dirs: Dirs,
}

impl Local {
    /// Use `parent` as the parent of `leaf` whatever its locators say.
    pub fn with_parent(mut self, leaf: &Path, parent: &Path) -> Self {
        self.named
            .push((leaf.to_string_lossy().into_owned(), parent.to_path_buf()));
        self
    }
}

impl Paths for Local {
    fn open(&mut self, path: &Path, write: bool) -> Result<File, ImageError> {
        let (f, dir) = open_named(path, write)?;
        self.dirs.insert(&path.to_string_lossy(), dir);
        Ok(f)
    }

    fn create(&mut self, path: &Path) -> Result<File, ImageError> {
        create_new_file(path)
    }

    fn remove(&mut self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    fn named_parent(
        &mut self,
        child: &str,
        write: bool,
    ) -> Option<Result<(File, String), ImageError>> {
        let (_, p) = self.named.iter().find(|(c, _)| c == child)?;
        let p = p.clone();
        Some(
            self.open(&p, write)
                .map(|f| (f, p.to_string_lossy().into_owned())),
        )
    }

    fn locate(
        &mut self,
        child: &str,
        locator: &ParentLocator,
        write: bool,
    ) -> Result<(File, String), ImageError> {
        // A child this Local did not open (a caller's own opener) has its
        // directory looked up now.
        let dir = match self.dirs.get(child) {
            Some(d) => d.try_clone_to_owned().map_err(ImageError::io("dup", 0))?,
            None => open_dir(dir_of(child).unwrap_or(Path::new(".")))?,
        };
        let (f, name, pdir) = locate_beneath(dir.as_fd(), dir_of(child), locator, write)?;
        self.dirs.insert(&name, pdir);
        Ok((f, name))
    }
}

/// The [`ParentOpener`] of the offline tools: parents through a [`Paths`].
#[derive(Debug)]
pub struct Opener<'a, P: Paths + ?Sized>(pub &'a mut P);

impl<P: Paths + ?Sized> ParentOpener for Opener<'_, P> {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        let (f, name) = open_parent_via(self.0, child, locators, parent_uuid, false)?;
        Ok((Box::new(f), name))
    }
}

/// [`Opener`] over [`Local`]: parents found on the filesystem, unconfined.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsParentOpener;

impl ParentOpener for FsParentOpener {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        Opener(&mut Local::default()).open_parent(child, locators, parent_uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_path_same_dir_is_dot_slash() {
        let r = relative_path(Path::new("/a/b"), Path::new("/a/b/base.vhd")).unwrap();
        assert_eq!(r, "./base.vhd");
        let r = relative_path(Path::new("/a/b"), Path::new("/a/c/base.vhd")).unwrap();
        assert_eq!(r, "../c/base.vhd");
        let r = relative_path(Path::new("/a/b/"), Path::new("/a/b/./x/../base.vhd")).unwrap();
        assert_eq!(r, "./base.vhd");
    }

    #[test]
    fn parent_is_looked_for_in_the_directory_the_child_was_opened_from() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        for (d, byte) in [(&a, b'A'), (&b, b'B')] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("base.img"), [byte; 512]).unwrap();
        }
        std::fs::write(a.join("leaf.img"), [0u8; 512]).unwrap();
        let leaf = a.join("leaf.img");
        let mut local = Local::default();
        local.open(&leaf, false).unwrap();
        // The directory's path now leads elsewhere: not followed.
        std::fs::rename(&a, tmp.path().join("a-moved")).unwrap();
        std::os::unix::fs::symlink(&b, &a).unwrap();
        let loc = ParentLocator {
            code: "W2ru".into(),
            path: "./base.img".into(),
            relative: true,
        };
        let (f, name) = local.locate(&leaf.to_string_lossy(), &loc, false).unwrap();
        let mut got = [0u8; 1];
        Backing::read_exact_at(&f, &mut got, 0).unwrap();
        assert_eq!(got, [b'A']);
        assert_eq!(Path::new(&name), a.join("base.img"));
    }
}
