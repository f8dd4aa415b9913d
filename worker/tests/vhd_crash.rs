//! Crash safety of thin provisioning: a "crash" (every write after the
//! k-th is lost) at any point of a block allocation or bitmap update
//! leaves an image that opens, reads each byte as either its old or its
//! new value, and that `check` + `repair` bring back to clean.

mod common;

use common::*;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tapjail_ctl::files::{
    check_path, create_path, open_file, repair_path, snapshot_path, FsParentOpener,
};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::{self as vhd, VhdOptions};
use tapjail_worker::image::{Backing, Image};

/// A file whose writes stop reaching the disk after `budget` of them, as
/// if the machine lost power there.
#[derive(Debug)]
struct Crashing {
    file: File,
    budget: Arc<AtomicUsize>,
}

impl Backing for Crashing {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Backing::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("crashed"));
        }
        self.budget.store(left - 1, Ordering::SeqCst);
        Backing::write_all_at(&self.file, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Backing::len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        Backing::set_len(&self.file, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        Backing::punch_hole(&self.file, offset, len)
    }
}

fn crash_run(path: &Path, budget: usize, ops: &dyn Fn(&dyn Image)) -> bool {
    let b = Arc::new(AtomicUsize::new(budget));
    let leaf = Crashing {
        file: open_file(path, false).unwrap(),
        budget: b.clone(),
    };
    let img = vhd::open(
        Box::new(leaf),
        &path.to_string_lossy(),
        false,
        &mut FsParentOpener,
        VhdOptions::default(),
    )
    .unwrap();
    ops(&img);
    let crashed = b.load(Ordering::SeqCst) == 0;
    // Dropping the image writes nothing more: the budget is spent (or the
    // batmap write is lost, which is allowed).
    drop(img);
    crashed
}

/// Each byte reads as before or as written.
fn old_or_new(got: &[u8], old: &[u8], new: &[u8], what: &str) {
    for i in 0..got.len() {
        assert!(
            got[i] == old[i] || got[i] == new[i],
            "{what}: byte {i} is {:#x}, neither old {:#x} nor new {:#x}",
            got[i],
            old[i],
            new[i]
        );
    }
}

fn exercise(tmp: &Path, make: &dyn Fn(&Path) -> Vec<u8>, writes: &[(u64, usize)]) {
    for budget in 0..40 {
        let p = tmp.join(format!("c{budget}.vhd"));
        let old = make(&p);
        let mut new = old.clone();
        for (i, &(off, len)) in writes.iter().enumerate() {
            new[off as usize..off as usize + len].copy_from_slice(&pattern(100 + i as u64, len));
        }
        let crashed = crash_run(&p, budget, &|img| {
            for (i, &(off, len)) in writes.iter().enumerate() {
                if img.write_at(&pattern(100 + i as u64, len), off).is_err() {
                    return;
                }
            }
            let _ = img.flush();
        });
        let got = read_all(&open(&p, true));
        old_or_new(&got, &old, &new, &format!("budget {budget}"));
        // Only the footer (not yet moved to the new end) and the batmap
        // (an optimisation, rebuilt by repair) may be inconsistent.
        for problem in check_path(&p).unwrap() {
            assert!(
                problem.field == "footer" || problem.field == "batmap",
                "budget {budget}: {problem}"
            );
        }
        let r = repair_path(&p).unwrap();
        assert!(r.remaining.is_empty(), "budget {budget}: {:?}", r.remaining);
        assert_eq!(
            read_all(&open(&p, true)),
            got,
            "budget {budget}: repair changed data"
        );
        if !crashed {
            assert_eq!(got, new);
            return;
        }
    }
    panic!("the writes never completed within the budget");
}

#[test]
fn crash_during_allocation_in_dynamic_image_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |p: &Path| {
        create_path(p, 2 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
        let img = open(p, false);
        img.write_at(&pattern(1, 70_000), 10).unwrap();
        img.flush().unwrap();
        read_all(&img)
    };
    // New blocks, an unaligned write into an allocated one, and a write
    // spanning both.
    exercise(
        tmp.path(),
        &make,
        &[(1 << 20, 5000), (20, 100), (60_000, 80_000)],
    );
}

#[test]
fn crash_during_allocation_and_bitmap_update_in_differencing_image_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |p: &Path| {
        let base = p.with_extension("base");
        create_path(&base, 2 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
        {
            let img = open(&base, false);
            img.write_at(&pattern(2, 2 << 20), 0).unwrap();
        }
        snapshot_path(p, &base, 65536).unwrap();
        let img = open(p, false);
        img.write_at(&pattern(3, 3000), 70_000).unwrap();
        img.flush().unwrap();
        read_all(&img)
    };
    // A partial block (bitmap bits), then more sectors of the same block.
    exercise(
        tmp.path(),
        &make,
        &[(1 << 20, 700), (71_000, 9000), (1_500_007, 100)],
    );
}

/// A writer killed between extending the file for a new block and writing
/// the end footer after it leaves only the footer copy at offset 0. The
/// next writable open puts the end footer back, so a clean close leaves an
/// image `check` passes even when that worker never allocates again; a
/// read-only open changes nothing.
#[test]
fn end_footer_cut_by_a_kill_is_restored_by_the_next_writable_open() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("cut.vhd");
    create_path(&p, 8 << 20, &CreateKind::dynamic()).unwrap();
    let img = open(&p, false);
    img.write_at(&[0x11; 4096], 1 << 20).unwrap();
    img.flush().unwrap();
    drop(img);
    let len = std::fs::metadata(&p).unwrap().len();
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 512)
        .unwrap();
    let cut = check_path(&p).unwrap();
    assert!(
        cut.iter().any(|f| f.field == "footer"),
        "the cut is seen: {cut:?}"
    );

    let reader = open(&p, true);
    drop(reader);
    assert_eq!(check_path(&p).unwrap(), cut, "a reader changes nothing");

    let writer = open(&p, false);
    // In place (the block is allocated): no allocation rewrites the footer.
    writer.write_at(&[0x22; 4096], (1 << 20) + 4096).unwrap();
    writer.flush().unwrap();
    drop(writer);
    assert_eq!(check_path(&p).unwrap(), vec![], "clean after a clean close");
    let back = open(&p, true);
    let mut got = vec![0u8; 8192];
    back.read_at(&mut got, 1 << 20).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0x11) && got[4096..].iter().all(|&b| b == 0x22));
}
