//! `Image::read_at_nowait`, the fast path the NBD reader uses to answer
//! page-cache hits without a thread handoff: whenever it says it read, the
//! bytes are exactly what `read_at` gives (through differencing chains,
//! partly written blocks, holes), it declines instead of reading a sector
//! bitmap or missing the page cache, and per-layer stats count a read once.

mod common;

use common::*;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use tapjail_ctl::files::{create_path, snapshot_path, FsParentOpener};
use tapjail_testsupport::require;
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::{chain, VhdImage, VhdOptions, DEFAULT_BLOCK_SIZE};
use tapjail_worker::image::{Backing, Image, ImageError, ParentLocator, ParentOpener};
use tapjail_worker::io::{CacheMode, UringFile};

const MIB: u64 = 1 << 20;

fn uring(path: &Path, mode: CacheMode) -> UringFile {
    let f = File::open(path).unwrap();
    UringFile::new(OwnedFd::from(f), mode).unwrap()
}

/// Opens parents as buffered io_uring files, like a worker run with
/// `--cache buffered`.
struct UringOpener;

impl ParentOpener for UringOpener {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        let (_, name) = FsParentOpener.open_parent(child, locators, uuid)?;
        Ok((Box::new(uring(Path::new(&name), CacheMode::Buffered)), name))
    }
}

fn open_uring_chain(leaf: &Path) -> VhdImage {
    chain::open(
        Box::new(uring(leaf, CacheMode::Buffered)),
        &leaf.to_string_lossy(),
        true,
        &mut UringOpener,
        VhdOptions::default(),
    )
    .unwrap()
}

/// Drop a file's clean pages from the page cache; false where that is not
/// possible (tmpfs keeps everything in memory).
fn evict(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: statfs writes into the zeroed struct we pass; fadvise takes integers.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        if libc::statfs(c.as_ptr(), &mut st) != 0 || st.f_type == libc::TMPFS_MAGIC {
            return false;
        }
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0
    }
}

/// A base with data in blocks 0-1, a leaf with a partly written block over
/// it and a leaf-only block; returns the expected contents.
fn chain_fixture(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.vhd");
    let leaf = dir.join("leaf.vhd");
    create_path(&base, 8 * MIB, &CreateKind::dynamic()).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    let put = |img: &VhdImage, model: &mut Vec<u8>, off: u64, data: Vec<u8>| {
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    let b = open(&base, false);
    put(&b, &mut model, 0, pattern(1, 4 * MIB as usize));
    drop(b);
    snapshot_path(&leaf, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let l = open(&leaf, false);
    put(&l, &mut model, MIB + 512, pattern(2, 3000));
    put(&l, &mut model, 6 * MIB + 4096, pattern(3, 8192));
    drop(l);
    model
}

#[test]
fn read_nowait_matches_read_at_through_a_chain_or_declines() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chain_fixture(tmp.path());
    let img = open_uring_chain(&tmp.path().join("leaf.vhd"));
    assert_eq!(img.layers().len(), 2);
    // (offset, len): a full parent block, a partly written leaf block
    // (needs its bitmap), unaligned, a hole, the leaf-only block.
    let probes = [
        (0u64, 4096usize),
        (MIB, 8192),
        (MIB + 100, 5000),
        (5 * MIB, 4096),
        (6 * MIB, 65536),
        (3 * MIB - 2048, 4096),
    ];
    let mut declined = 0;
    for round in 0..2 {
        for &(off, len) in &probes {
            let mut buf = vec![0xeeu8; len];
            if img.read_at_nowait(&mut buf, off) {
                assert!(
                    buf == model[off as usize..off as usize + len],
                    "round {round}: nowait read at {off}+{len} differs"
                );
            } else {
                declined += 1;
                assert_eq!(round, 0, "declined at {off}+{len} once bitmaps are cached");
                // The slow path loads what was missing (the bitmap).
                img.read_at(&mut buf, off).unwrap();
                assert!(buf == model[off as usize..off as usize + len]);
            }
        }
    }
    // The partly written leaf blocks need bitmaps nobody had loaded yet.
    assert!(declined >= 1, "a bitmap read must be declined, not done");
    // Out of range is declined, never read.
    let mut b = [0u8; 512];
    assert!(!img.read_at_nowait(&mut b, 8 * MIB - 256));
}

#[test]
fn read_nowait_declines_a_page_cache_miss_and_counts_hits_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chain_fixture(tmp.path());
    let leaf = tmp.path().join("leaf.vhd");
    let base = tmp.path().join("base.vhd");
    let img = open_uring_chain(&leaf);
    let mut buf = vec![0u8; 4096];
    // Warm: the base's block 0 is in the page cache after a normal read.
    img.read_at(&mut buf, 0).unwrap();
    let before = img.stats();
    assert!(img.read_at_nowait(&mut buf, 0));
    assert!(buf == model[..4096]);
    let after = img.stats();
    assert_eq!(after[0].hits, before[0].hits, "nothing read from the leaf");
    assert_eq!(
        after[1].hits[0],
        before[1].hits[0] + 8,
        "8 sectors from the base"
    );
    // A miss starts readahead (RWF_NOWAIT means "do not wait", not "no
    // I/O"), which on a fast device can finish before the kernel looks
    // again; so evict before each probe and require declines, not all.
    let mut declined = 0;
    for i in 0..8u64 {
        if !require(
            evict(&base),
            "cannot evict the page cache on this filesystem (tmpfs? set TMPDIR to a disk filesystem)",
        ) {
            return;
        }
        let off = 2 * MIB + i * 256 * 1024;
        let before = img.stats();
        if img.read_at_nowait(&mut buf, off) {
            assert!(buf == model[off as usize..off as usize + 4096]);
        } else {
            declined += 1;
            assert_eq!(img.stats(), before, "a declined read counts nothing");
            img.read_at(&mut buf, off).unwrap();
            assert!(buf == model[off as usize..off as usize + 4096]);
        }
    }
    assert!(declined > 0, "page-cache misses must be declined");
}

#[test]
fn read_nowait_on_raw_and_direct_files() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("disk.raw");
    let data = pattern(9, MIB as usize);
    std::fs::write(&p, &data).unwrap();
    let raw = RawImage::open(Box::new(uring(&p, CacheMode::Buffered)), "disk.raw", true).unwrap();
    let mut buf = vec![0u8; 12345];
    assert!(raw.read_at_nowait(&mut buf, 777));
    assert!(buf == data[777..777 + 12345]);
    assert_eq!(raw.stats()[0].hits[0], 12345u64.div_ceil(512));
    assert!(!raw.read_at_nowait(&mut buf, MIB - 10), "out of range");
    // A direct file always waits for the device: never inline.
    let direct = uring(&p, CacheMode::Auto);
    if require(
        direct.is_direct(),
        "O_DIRECT on the temp dir's filesystem (tmpfs? set TMPDIR to a disk filesystem)",
    ) {
        let mut b = tapjail_worker::io::AlignedBuf::zeroed(4096);
        assert!(!direct.read_exact_at_nowait(&mut b, 0));
    }
    // Plain files (offline tools) never take the fast path.
    let f = File::open(&p).unwrap();
    assert!(!Backing::read_exact_at_nowait(&f, &mut buf, 0));
}
