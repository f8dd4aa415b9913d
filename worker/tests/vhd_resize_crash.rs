//! Crash safety of `resize` when the BAT must grow: blocks in its way move
//! to the end and metadata stays first. A "crash" (every write after the
//! k-th is lost) at each point leaves an image that opens at the old or
//! the new size with the same data, that `check` flags at most as
//! repairable (footer, batmap), and that `repair` brings back to clean.
//! Finished resizes are checked for blktap's layout, and qemu reads them
//! as it read them before (with zeros after).

mod common;

use common::*;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use tapjail_ctl::files::{check_path, create_path, open_file, repair_path, snapshot_path};
use tapjail_worker::image::vhd::check::Fix;
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::layout::Metadata;
use tapjail_worker::image::vhd::resize::resize;
use tapjail_worker::image::{Backing, Image};

/// A file whose writes stop reaching the disk after `budget` of them, as
/// if the machine lost power there (flushes are free: nothing after the
/// budget lands anyway).
#[derive(Debug)]
struct Crashing {
    file: File,
    budget: AtomicUsize,
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
        if self.budget.load(Ordering::SeqCst) == 0 {
            return Err(io::Error::other("crashed"));
        }
        Backing::set_len(&self.file, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        Backing::punch_hole(&self.file, offset, len)
    }
}

/// The first `n` bytes of the disk (the rest of a grown disk is checked
/// by its size and a sample at the end: reading 300 MiB per crash point
/// would only measure memcpy).
fn read_prefix(img: &dyn Image, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n.min(img.virtual_size() as usize)];
    img.read_at(&mut b, 0).unwrap();
    b
}

/// The disk reads as `old`, at the old size or grown with zeros.
fn same_data(p: &Path, old: &[u8], new_size: u64, what: &str) -> u64 {
    let img = open(p, true);
    let size = img.virtual_size();
    assert!(
        size == old.len() as u64 || size == new_size,
        "{what}: size {size}, neither {} nor {new_size}",
        old.len()
    );
    let got = read_prefix(&img, old.len() + (4 << 20));
    assert!(got[..old.len()] == *old, "{what}: data changed");
    assert!(
        got[old.len()..].iter().all(|&b| b == 0),
        "{what}: growth not zero"
    );
    let mut tail = vec![0xaau8; 4096];
    img.read_at(&mut tail, size - 4096).unwrap();
    if size == new_size {
        assert!(tail.iter().all(|&b| b == 0), "{what}: tail not zero");
    }
    size
}

/// Every block starts after the metadata, and a block the resize placed
/// has its data 4 KiB-aligned.
fn metadata_first(p: &Path, unaligned_before: &[u64]) {
    let f = open_file(p, true).unwrap();
    let meta = Metadata::read(&f).unwrap();
    let s = meta.sparse.as_ref().unwrap();
    for (b, &e) in s.bat.iter().enumerate() {
        if e == u32::MAX {
            continue;
        }
        let start = u64::from(e) * 512;
        assert!(
            start >= s.metadata_end,
            "block {b} at {start} before metadata end {}",
            s.metadata_end
        );
        let data = start + u64::from(s.bitmap_bytes);
        assert!(
            data % 4096 == 0 || unaligned_before.contains(&start),
            "block {b}'s data at {data} is not 4 KiB-aligned"
        );
    }
}

fn exercise(tmp: &Path, make: &dyn Fn(&Path) -> Vec<u8>, new_size: u64) -> usize {
    let mut qemu_before = None;
    for budget in 0..400 {
        let p = tmp.join(format!("r{budget}.vhd"));
        let old = make(&p);
        // qemu's vpc driver shows no parent: compare qemu with itself.
        let qb = qemu_before.get_or_insert_with(|| qemu_raw(&p, tmp));
        let before = {
            let f = open_file(&p, true).unwrap();
            let m = Metadata::read(&f).unwrap();
            let s = m.sparse.unwrap();
            s.bat
                .iter()
                .filter(|&&e| e != u32::MAX)
                .map(|&e| u64::from(e) * 512)
                .collect::<Vec<_>>()
        };
        let file = Crashing {
            file: open_file(&p, false).unwrap(),
            budget: AtomicUsize::new(budget),
        };
        let result = resize(&file, new_size);
        let crashed = file.budget.load(Ordering::SeqCst) == 0 && result.is_err();
        assert!(crashed || result.is_ok(), "budget {budget}: {result:?}");
        drop(file);
        let what = format!("budget {budget}");
        let size = same_data(&p, &old, new_size, &what);
        let problems = check_path(&p).unwrap();
        for problem in &problems {
            assert_eq!(problem.fix(), Fix::Repair, "{what}: {problem}");
            assert!(
                problem.field == "footer" || problem.field == "batmap",
                "{what}: {problem}"
            );
        }
        let r = repair_path(&p).unwrap();
        assert!(r.remaining.is_empty(), "{what}: {:?}", r.remaining);
        assert_eq!(same_data(&p, &old, new_size, &what), size, "{what}: repair");
        if !crashed {
            assert!(problems.is_empty(), "clean resize: {problems:?}");
            assert_eq!(size, new_size);
            metadata_first(&p, &before);
            let q = qemu_raw(&p, tmp);
            assert_eq!(q.len() as u64, new_size);
            assert!(q[..qb.len()] == qb[..], "qemu reads other data");
            assert!(q[qb.len()..].iter().all(|&b| b == 0));
            return budget;
        }
        std::fs::remove_file(&p).unwrap();
    }
    panic!("resize never completed within the budget");
}

/// 10 MiB in 64 KiB blocks: block 0 sits right where the grown BAT's
/// batmap goes, so growing to 20 MiB must move it (and the others after).
fn tap_dynamic(p: &Path) -> Vec<u8> {
    create_path(p, 10 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    let img = open(p, false);
    img.write_at(&pattern(1, 4096), 0).unwrap();
    img.write_at(&pattern(2, 100_000), 70_000).unwrap();
    img.write_at(&pattern(3, 65536), 5 * 65536).unwrap(); // full: batmap bit
    img.flush().unwrap();
    read_all(&img)
}

#[test]
fn crash_at_every_write_of_a_resize_that_moves_blocks_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let writes = exercise(tmp.path(), &tap_dynamic, 20 << 20);
    // Moves happened: each is several writes, beyond the table's own.
    assert!(writes > 8, "only {writes} writes: no block moved?");
}

#[test]
fn crash_at_every_write_of_resizing_a_qemu_image_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |p: &Path| {
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "vpc", ps, "10M"]);
        qemu_io(&["-f", "vpc", "-c", "write -P 0x5a 0 4k", ps]);
        read_all(&open(p, true))
    };
    // qemu puts block 0 right after its BAT: growing to 300 MiB moves it.
    exercise(tmp.path(), &make, 300 << 20);
}

#[test]
fn crash_at_every_write_of_resizing_a_differencing_child_keeps_its_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |p: &Path| {
        let base = p.with_extension("base");
        create_path(&base, 10 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
        {
            let img = open(&base, false);
            img.write_at(&pattern(4, 3 << 20), 0).unwrap();
        }
        snapshot_path(p, &base, 65536).unwrap();
        let img = open(p, false);
        img.write_at(&pattern(5, 4096), 0).unwrap();
        img.write_at(&pattern(6, 70_000), 1 << 20).unwrap();
        img.flush().unwrap();
        read_all(&img)
    };
    exercise(tmp.path(), &make, 20 << 20);
}
