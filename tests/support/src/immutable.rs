//! A file made immutable (`chattr +i`) for as long as a guard lives.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `chattr +i` on a file until dropped: writes through fds already open on
/// it fail with EPERM, a real write failure (the audit tests use it to make
/// the broker's audit log fail under it).
#[derive(Debug)]
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(p: &Path) -> Immutable {
        let st = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .expect("chattr (e2fsprogs) is needed to make a file's writes fail");
        assert!(st.success(), "chattr +i {}: {st}", p.display());
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}
