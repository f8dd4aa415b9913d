//! A full disk while allocating a block: the write fails with an error,
//! and the image is left exactly as valid as before (the old footer back
//! at the end, no BAT entry pointing at a half-written block), so that
//! `check` stays clean and nothing needs `repair`.

mod common;

use common::*;
use std::fs::File;
use std::io;
use std::path::Path;
use tapjail_ctl::files::{check_path, create_path, open_file, FsParentOpener};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::{self as vhd, VhdOptions};
use tapjail_worker::image::{Backing, Image};

/// A file on a filesystem with `limit` bytes of room: writes past it
/// store what fits and then fail with ENOSPC, as pwrite does.
#[derive(Debug)]
struct Full {
    file: File,
    limit: u64,
}

impl Backing for Full {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Backing::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let room = self.limit.saturating_sub(offset).min(buf.len() as u64) as usize;
        Backing::write_all_at(&self.file, &buf[..room], offset)?;
        if room < buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Backing::len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        // Extending a file allocates nothing, so it succeeds.
        Backing::set_len(&self.file, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        Backing::punch_hole(&self.file, offset, len)
    }
}

const BS: u32 = 65536;

fn run(p: &Path, extra: u64) {
    let len = std::fs::metadata(p).unwrap().len();
    let before = read_all(&open(p, true));
    let leaf = Full {
        file: open_file(p, false).unwrap(),
        limit: len + extra,
    };
    let img = vhd::open(
        Box::new(leaf),
        &p.to_string_lossy(),
        false,
        &mut FsParentOpener,
        VhdOptions::default(),
    )
    .unwrap();
    // Block 5 is not allocated yet: the write must allocate it.
    let r = img.write_at(&pattern(9, 4096), 5 * u64::from(BS) + 1024);
    drop(img);
    if r.is_ok() {
        return;
    }
    assert_eq!(
        check_path(p).unwrap(),
        vec![],
        "room {extra}: a failed allocation left the image inconsistent"
    );
    assert!(
        read_all(&open(p, true)) == before,
        "room {extra}: a failed write changed what the disk reads"
    );
}

#[test]
fn full_disk_during_allocation_leaves_the_image_clean() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for nothing, part of the bitmap, the bitmap, part of the data,
    // all but the footer, part of the footer.
    for extra in [
        0,
        100,
        512,
        512 + 3000,
        512 + u64::from(BS),
        512 + u64::from(BS) + 200,
    ] {
        let p = tmp.path().join(format!("d{extra}.vhd"));
        create_path(&p, 1 << 20, &CreateKind::Dynamic { block_size: BS }).unwrap();
        let img = open(&p, false);
        img.write_at(&pattern(1, 5000), 100).unwrap();
        img.flush().unwrap();
        drop(img);
        run(&p, extra);
    }
}

#[test]
fn full_disk_during_allocation_leaves_a_differencing_image_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    create_path(&base, 1 << 20, &CreateKind::Dynamic { block_size: BS }).unwrap();
    let img = open(&base, false);
    img.write_at(&pattern(2, 1 << 20), 0).unwrap();
    img.flush().unwrap();
    drop(img);
    for extra in [
        0,
        100,
        512,
        512 + 3000,
        512 + u64::from(BS),
        512 + u64::from(BS) + 200,
    ] {
        let p = tmp.path().join(format!("c{extra}.vhd"));
        tapjail_ctl::files::snapshot_path(&p, &base, BS).unwrap();
        run(&p, extra);
    }
}

/// A crash between writing a new block and linking it into the BAT leaves
/// an unlinked block between the last real one and the end footer. The
/// next allocation reuses that space; when it then fails on a full disk,
/// only the end footer has to come back (the unlinked bytes are nobody's),
/// so a block-sized copy is never needed: the worker runs under a small
/// RLIMIT_MEMLOCK where one could abort it.
#[test]
fn full_disk_after_a_crash_left_an_unlinked_block_leaves_the_image_clean() {
    let tmp = tempfile::tempdir().unwrap();
    for extra in [0, 100, 512, 512 + u64::from(BS)] {
        let p = tmp.path().join(format!("u{extra}.vhd"));
        create_path(&p, 1 << 20, &CreateKind::Dynamic { block_size: BS }).unwrap();
        let img = open(&p, false);
        img.write_at(&pattern(1, 5000), 100).unwrap();
        img.flush().unwrap();
        drop(img);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut footer = [0u8; 512];
        f.read_exact_at(&mut footer, len - 512).unwrap();
        let orphan = pattern(7, 512 + BS as usize);
        f.write_all_at(&orphan, len - 512).unwrap();
        f.write_all_at(&footer, len + BS as u64).unwrap();
        drop(f);
        assert_eq!(check_path(&p).unwrap(), vec![], "the unlinked block alone");
        run(&p, extra);
    }
}
