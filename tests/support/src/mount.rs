//! A small tmpfs mounted for one test: a real filesystem that fills up
//! (ENOSPC) at a size the test chooses, unmounted when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted over a directory until dropped.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `bytes` (rounded up to pages) at `at`, mode 0755.
    pub fn mount(at: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("tapjail-test")
            .arg(at)
            .status()
            .expect("mount(8)");
        assert!(st.success(), "mount -t tmpfs at {}: {st}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Fill every free byte with a file `name`, 4 KiB at a time until the
    /// filesystem says ENOSPC. Returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.0.join(name)).expect("filler");
        let block = [0xa5u8; 4096];
        let mut n = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.0.display()),
            }
        }
        n
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
