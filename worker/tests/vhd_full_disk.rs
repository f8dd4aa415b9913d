//! A full disk while allocating a block: the write fails with an error,
//! and the image is left exactly as valid as before (the old footer back
//! at the end, no BAT entry pointing at a half-written block), so that
//! `check` stays clean and nothing needs `repair`.

mod common;

use common::*;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tapjail_ctl::files::{check_path, create_path, open_file, FsParentOpener};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::{self as vhd, VhdOptions};
use tapjail_worker::image::{Backing, Image, ImageError};

/// A file on a filesystem with room up to byte `limit`: writes past it
/// store what fits and then fail with ENOSPC, as pwrite does. `high`
/// records the end of the furthest write asked for.
#[derive(Debug)]
struct Full {
    file: File,
    limit: u64,
    high: Arc<AtomicU64>,
}

impl Backing for Full {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Backing::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.high
            .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
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
/// The allocating write every case makes: block 5 is not allocated yet.
const AT: u64 = 5 * BS as u64 + 1024;

/// Open `p` over a [`Full`] with room up to `limit` and make the
/// allocating write; returns its result and the end of the furthest write.
fn write_with_room(p: &Path, limit: u64) -> (Result<(), ImageError>, u64) {
    let high = Arc::new(AtomicU64::new(0));
    let leaf = Full {
        file: open_file(p, false).unwrap(),
        limit,
        high: high.clone(),
    };
    let img = vhd::open(
        Box::new(leaf),
        &p.to_string_lossy(),
        false,
        &mut FsParentOpener,
        VhdOptions::default(),
    )
    .unwrap();
    let r = img.write_at(&pattern(9, 4096), AT);
    drop(img);
    (r, high.load(Ordering::Relaxed))
}

/// How far past `from` the allocating write reaches, measured on a copy of
/// `p` with unlimited room: any room below it must make the write fail.
fn room_needed(p: &Path, from: u64) -> u64 {
    let twin = p.with_extension("twin");
    std::fs::copy(p, &twin).unwrap();
    let (r, high) = write_with_room(&twin, u64::MAX);
    r.unwrap();
    std::fs::remove_file(&twin).unwrap();
    assert!(high > from, "the allocating write reaches past {from}");
    high - from
}

/// Room for nothing, part of the bitmap, the bitmap, part of the data,
/// all but the footer, all but one byte: every case short of `need`.
fn rooms(need: u64) -> Vec<u64> {
    let mut r: Vec<u64> = [0, 100, 512, 512 + 3000, need - 512, need - 200, need - 1]
        .into_iter()
        .filter(|&x| x < need)
        .collect();
    r.dedup();
    r
}

/// The allocating write on `p` with `extra` bytes of room past `from`:
/// it fails with ENOSPC, and the image is as clean and reads as before.
fn run(p: &Path, from: u64, extra: u64) {
    let before = read_all(&open(p, true));
    let (r, _) = write_with_room(p, from + extra);
    let e = r.expect_err(&format!(
        "room {extra}: less room than the allocation needs, so the write must fail"
    ));
    assert_eq!(e.errno(), libc::ENOSPC, "room {extra}: {e}");
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

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn full_disk_during_allocation_leaves_the_image_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let p = tmp.path().join(name);
        create_path(&p, 1 << 20, &CreateKind::Dynamic { block_size: BS }).unwrap();
        let img = open(&p, false);
        img.write_at(&pattern(1, 5000), 100).unwrap();
        img.flush().unwrap();
        drop(img);
        p
    };
    let p = fresh("probe.vhd");
    let need = room_needed(&p, len(&p));
    assert!(need > u64::from(BS), "a block and more: {need}");
    for extra in rooms(need) {
        let p = fresh(&format!("d{extra}.vhd"));
        run(&p, len(&p), extra);
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
    let fresh = |name: &str| {
        let p = tmp.path().join(name);
        tapjail_ctl::files::snapshot_path(&p, &base, BS).unwrap();
        p
    };
    let p = fresh("probe.vhd");
    let need = room_needed(&p, len(&p));
    assert!(need > u64::from(BS), "a block and more: {need}");
    for extra in rooms(need) {
        let p = fresh(&format!("c{extra}.vhd"));
        run(&p, len(&p), extra);
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
        // The room counts from where the unlinked block starts, as if the
        // crash had left it a hole: the allocation reuses that space.
        let need = room_needed(&p, len - 512);
        assert!(extra < need, "room {extra} of {need}");
        run(&p, len - 512, extra);
    }
}

/// A tmpfs of `kib` KiB on a fresh temp dir: a real filesystem of known
/// size, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(kib: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k,mode=0700")])
            .arg("tapjail-full-disk")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount a {kib} KiB tmpfs on {}",
            dir.path().display()
        );
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill every free byte with `filler`, 4 KiB at a time until ENOSPC.
    fn fill(&self) -> File {
        let p = self.path().join("filler");
        let f = File::create(&p).unwrap();
        let page = [0xa5u8; 4096];
        let mut at = 0u64;
        loop {
            match Backing::write_all_at(&f, &page, at) {
                Ok(()) => at += page.len() as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        // A short write may have stored part of the last page.
        f.set_len(at).unwrap();
        f
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The same through a real filesystem: a 1 MiB tmpfs filled exactly, then
/// `room` bytes freed, each less than the allocation needs. The write must
/// fail with ENOSPC every time (no room for luck), leave the image clean
/// and reading as before, and succeed once the space is back.
#[test]
fn full_disk_on_a_real_filesystem_fails_the_write_and_loses_nothing() {
    if !tapjail_testsupport::require(
        tapjail_testsupport::is_root(),
        "needs root to mount a small tmpfs",
    ) {
        return;
    }
    let fs = SmallFs::mount(1024);
    let p = fs.path().join("d.vhd");
    create_path(&p, 1 << 20, &CreateKind::Dynamic { block_size: BS }).unwrap();
    let img = open(&p, false);
    img.write_at(&pattern(1, 5000), 100).unwrap();
    img.flush().unwrap();
    drop(img);
    let before = read_all(&open(&p, true));
    // What the write really allocates (the rest of the block stays a
    // hole): measured on a twin in the same filesystem.
    let need = {
        let twin = fs.path().join("twin.vhd");
        std::fs::copy(&p, &twin).unwrap();
        let used = |q: &Path| std::fs::metadata(q).unwrap().blocks() * 512;
        let was = used(&twin);
        let img = open(&twin, false);
        img.write_at(&pattern(9, 4096), AT).unwrap();
        img.flush().unwrap();
        drop(img);
        let need = used(&twin) - was;
        std::fs::remove_file(&twin).unwrap();
        need
    };
    assert!(
        need >= 8192,
        "at least a bitmap page and a data page: {need}"
    );
    let filler = fs.fill();
    let full = filler.metadata().unwrap().len();
    for room in (0..need).step_by(4096) {
        filler.set_len(full - room).unwrap();
        let img = open(&p, false);
        let e = img
            .write_at(&pattern(9, 4096), AT)
            .expect_err(&format!("room {room} of {need}: the write must fail"));
        assert_eq!(e.errno(), libc::ENOSPC, "room {room}: {e}");
        drop(img);
        assert_eq!(check_path(&p).unwrap(), vec![], "room {room}");
        assert!(
            read_all(&open(&p, true)) == before,
            "room {room}: a failed write changed what the disk reads"
        );
        // Back to full for the next round.
        filler.set_len(full).unwrap();
    }
    // With the space back, the same write goes through and reads back.
    drop(filler);
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let img = open(&p, false);
    img.write_at(&pattern(9, 4096), AT).unwrap();
    img.flush().unwrap();
    let mut got = vec![0u8; 4096];
    img.read_at(&mut got, AT).unwrap();
    assert!(got == pattern(9, 4096));
    drop(img);
    assert_eq!(check_path(&p).unwrap(), vec![]);
}
