//! Emptying a writable sparse layer in place: every block becomes
//! unallocated, on disk and in memory. A file secondary (`-2 vhd:PATH`)
//! that takes over from a leaf that ran out of space holds every write the
//! leaf has, and more; emptying the retired leaf makes any later open of it
//! (a respawned tapdisk) read through to the secondary instead of the
//! leaf's stale sectors. It needs no space: the BAT and the batmap are
//! rewritten where they are, then synced. The blocks' bytes stay in the
//! file, unreferenced (new blocks are appended after them).

use super::{lock, VhdLayer};
use crate::vhd::bat::UNUSED;
use crate::ImageError;
use std::sync::atomic::Ordering;

impl VhdLayer {
    /// Make every block unallocated, durably. Writers must be done with
    /// the layer (nothing is written to it after this).
    pub fn empty_in_place(&self) -> Result<(), ImageError> {
        let Some(s) = &self.sparse else {
            return Err(ImageError::InvalidArgument(format!(
                "{}: a fixed VHD has no blocks to unallocate",
                self.name
            )));
        };
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let _alloc = lock(&s.alloc);
        let mut bat = s.bat.write().unwrap_or_else(|p| p.into_inner());
        bat.fill(UNUSED);
        for w in s.full.iter().chain(&s.hinted) {
            w.store(0, Ordering::Release);
        }
        lock(&s.pending_bat).clear();
        for shard in &s.bitmaps {
            lock(shard).clear();
        }
        let table = s.header.table_offset();
        let len = bat.len() as u64 * 4;
        drop(bat);
        const ALL_UNUSED: [u8; 4096] = [0xFF; 4096];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ALL_UNUSED.len() as u64);
            self.file
                .write_all_at(&ALL_UNUSED[..n as usize], table + done)
                .map_err(ImageError::io("write BAT", table + done))?;
            done += n;
        }
        s.batmap_dirty.store(true, Ordering::Release);
        self.write_batmap()?;
        self.file.sync_data().map_err(ImageError::io("fsync", 0))
    }
}

#[cfg(test)]
mod tests {
    use crate::vhd::chain;
    use crate::vhd::create::{create, CreateKind};
    use crate::{Image, ParentOpener};

    struct NoParents;
    impl ParentOpener for NoParents {
        fn open_parent(
            &mut self,
            _: &str,
            _: &[crate::ParentLocator],
            _: [u8; 16],
        ) -> Result<(Box<dyn crate::Backing>, String), crate::ImageError> {
            unreachable!("a dynamic VHD has no parent")
        }
    }

    #[test]
    fn an_emptied_layer_reads_as_zeroes_checks_clean_and_reopens_empty() {
        let f = tempfile::NamedTempFile::new().unwrap();
        create(f.as_file(), 8 << 20, &CreateKind::dynamic()).unwrap();
        let rw = || {
            let file = std::fs::File::options()
                .read(true)
                .write(true)
                .open(f.path())
                .unwrap();
            chain::open(
                Box::new(file),
                "l",
                false,
                &mut NoParents,
                Default::default(),
            )
            .unwrap()
        };
        let img = rw();
        // One whole block (batmap bit) and a partial one.
        img.write_at(&vec![7u8; 2 << 20], 0).unwrap();
        img.write_at(&[9u8; 4096], 5 << 20).unwrap();
        img.flush().unwrap();
        img.leaf().empty_in_place().unwrap();
        let mut buf = vec![1u8; 8 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        drop(img);
        let problems = crate::vhd::check::check(&std::fs::File::open(f.path()).unwrap());
        assert!(problems.is_empty(), "{problems:?}");
        let img = rw();
        let mut buf = vec![1u8; 8 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "reopened: still empty");
        // It takes writes again.
        img.write_at(&[3u8; 512], 4096).unwrap();
        img.read_at(&mut buf[..8192], 0).unwrap();
        assert!(buf[4096..4608].iter().all(|&b| b == 3));
    }
}
