//! Corrupt and hostile images: each gets a clean, typed error naming the
//! field at fault, never a panic; `check` lists every problem.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use tapjail_ctl::files::{create_path, open_file, snapshot_path};
use tapjail_worker::image::vhd::check::check;
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::{VhdLayer, VhdOptions, DEFAULT_BLOCK_SIZE};
use tapjail_worker::image::{Image, ImageError};

const MIB: u64 = 1 << 20;
const HDR: usize = 512;

fn be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn sum_into(b: &mut [u8], at: usize) {
    b[at..at + 4].fill(0);
    let s = !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    b[at..at + 4].copy_from_slice(&s.to_be_bytes());
}

/// Recompute both footer checksums and the dynamic header's.
fn fix_sums(b: &mut [u8]) {
    let n = b.len();
    if n >= 1024 && &b[0..8] == b"conectix" {
        sum_into(&mut b[0..512], 64);
    }
    if n >= 512 && &b[n - 512..n - 504] == b"conectix" {
        sum_into(&mut b[n - 512..], 64);
    }
    if n >= HDR + 1024 && &b[HDR..HDR + 8] == b"cxsparse" {
        sum_into(&mut b[HDR..HDR + 1024], 36);
    }
}

/// An 8 MiB dynamic image with blocks 0 and 2 allocated (BAT at 1536).
fn dynamic_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("d.vhd");
    create_path(&p, 8 * MIB, &CreateKind::dynamic()).unwrap();
    let img = open(&p, false);
    img.write_at(&pattern(1, 5000), 100).unwrap();
    img.write_at(&pattern(2, 5000), 4 * MIB + 7).unwrap();
    img.flush().unwrap();
    drop(img);
    let b = std::fs::read(&p).unwrap();
    (p, b)
}

fn open_bytes(dir: &Path, bytes: &[u8]) -> Result<VhdLayer, ImageError> {
    let p = dir.join("case.vhd");
    std::fs::write(&p, bytes).unwrap();
    VhdLayer::open(
        Box::new(open_file(&p, true).unwrap()),
        "case.vhd",
        true,
        VhdOptions::default(),
    )
}

fn expect_corrupt(dir: &Path, case: &str, bytes: &[u8], field: &str) {
    match open_bytes(dir, bytes) {
        Err(ImageError::Corrupt { field: f, reason }) => {
            assert_eq!(f, field, "{case}: wrong field ({reason})");
            // check() reports it too, without panicking.
            let file = open_file(&dir.join("case.vhd"), true).unwrap();
            assert!(!check(&file).is_empty(), "{case}: check found nothing");
        }
        Err(e) => panic!("{case}: expected a corrupt {field}, got {e}"),
        Ok(_) => panic!("{case}: a corrupt image opened"),
    }
}

#[test]
fn corrupt_images_give_typed_errors_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_, good) = dynamic_image(d);
    let n = good.len();
    assert!(open_bytes(d, &good).is_ok());
    let bat = 1536;

    let case = |f: &dyn Fn(&mut Vec<u8>), fix: bool| {
        let mut b = good.clone();
        f(&mut b);
        if fix {
            fix_sums(&mut b);
        }
        b
    };

    expect_corrupt(d, "empty file", &[], "footer");
    expect_corrupt(d, "100-byte file", &[0u8; 100], "footer");
    expect_corrupt(d, "garbage", &pattern(9, 8192), "footer.cookie");
    let bad_cookie = case(
        &|b| {
            b[0] = b'X';
            b[n - 512] = b'X';
        },
        false,
    );
    expect_corrupt(d, "bad cookie", &bad_cookie, "footer.cookie");
    let bad_sum = case(
        &|b| {
            b[40] ^= 1;
            b[n - 512 + 40] ^= 1;
        },
        false,
    );
    expect_corrupt(d, "bad checksum", &bad_sum, "footer.checksum");
    let bad_type = case(
        &|b| {
            be32(b, 60, 7);
            be32(b, n - 512 + 60, 7);
        },
        true,
    );
    expect_corrupt(d, "unknown disk type", &bad_type, "footer.disk_type");
    let huge = case(
        &|b| {
            be64(b, 48, u64::MAX);
            be64(b, n - 512 + 48, u64::MAX);
        },
        true,
    );
    expect_corrupt(d, "huge current_size", &huge, "footer.current_size");
    let hdr_far = case(
        &|b| {
            be64(b, 16, 1 << 40);
            be64(b, n - 512 + 16, 1 << 40);
        },
        true,
    );
    expect_corrupt(d, "header beyond EOF", &hdr_far, "footer.data_offset");
    let hdr_cookie = case(&|b| b[HDR] = b'x', true);
    expect_corrupt(d, "bad header cookie", &hdr_cookie, "header.cookie");
    let hdr_sum = case(&|b| b[HDR + 900] ^= 1, false);
    expect_corrupt(d, "bad header checksum", &hdr_sum, "header.checksum");
    let bs3 = case(&|b| be32(b, HDR + 32, 3 << 20), true);
    expect_corrupt(
        d,
        "block size not a power of two",
        &bs3,
        "header.block_size",
    );
    let bs_big = case(&|b| be32(b, HDR + 32, 1 << 30), true);
    expect_corrupt(d, "block size too large", &bs_big, "header.block_size");
    let bs_zero = case(&|b| be32(b, HDR + 32, 0), true);
    expect_corrupt(d, "block size zero", &bs_zero, "header.block_size");
    let mte_huge = case(&|b| be32(b, HDR + 28, u32::MAX), true);
    expect_corrupt(
        d,
        "huge max_table_entries",
        &mte_huge,
        "header.max_table_entries",
    );
    let mte_small = case(&|b| be32(b, HDR + 28, 1), true);
    expect_corrupt(
        d,
        "BAT smaller than the disk",
        &mte_small,
        "header.max_table_entries",
    );
    let bat_over = case(&|b| be64(b, HDR + 16, 512), true);
    expect_corrupt(
        d,
        "BAT overlapping the header",
        &bat_over,
        "header.table_offset",
    );
    let bat_unaligned = case(&|b| be64(b, HDR + 16, 1537), true);
    expect_corrupt(d, "BAT unaligned", &bat_unaligned, "header.table_offset");
    let bat_far = case(&|b| be64(b, HDR + 16, 1 << 50), true);
    expect_corrupt(d, "BAT beyond EOF", &bat_far, "header.table_offset");
    let entry_far = case(&|b| be32(b, bat + 4, 0x00ff_ffff), false);
    expect_corrupt(d, "BAT entry beyond EOF", &entry_far, "bat");
    let entry_hdr = case(&|b| be32(b, bat + 4, 1), false);
    expect_corrupt(d, "BAT entry on the header", &entry_hdr, "bat");
    let entry_dup = case(
        &|b| {
            let e0 = b[bat..bat + 4].to_vec();
            b[bat + 4..bat + 8].copy_from_slice(&e0);
        },
        false,
    );
    expect_corrupt(d, "two blocks in one place", &entry_dup, "bat");
    let mut truncated = good[..4 * MIB as usize].to_vec();
    truncated.truncate(3 * MIB as usize);
    expect_corrupt(d, "truncated file", &truncated, "bat");
    expect_corrupt(
        d,
        "truncated to the headers",
        &good[..1000],
        "footer.data_offset",
    );
}

#[test]
fn corrupt_fixed_image_shorter_than_its_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.vhd");
    create_path(&p, 4 * MIB, &CreateKind::Fixed).unwrap();
    let b = std::fs::read(&p).unwrap();
    let footer = b[b.len() - 512..].to_vec();
    let mut cut = b[..MIB as usize].to_vec();
    cut.extend_from_slice(&footer);
    expect_corrupt(tmp.path(), "truncated fixed", &cut, "footer.current_size");
}

#[test]
fn corrupt_parent_locators_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = d.join("base.vhd");
    create_path(&base, 4 * MIB, &CreateKind::dynamic()).unwrap();
    let child = d.join("child.vhd");
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let good = std::fs::read(&child).unwrap();
    let loc0 = HDR + 576;
    let mut far = good.clone();
    be64(&mut far, loc0 + 16, 1 << 45);
    fix_sums(&mut far);
    expect_corrupt(
        d,
        "locator beyond EOF",
        &far,
        "header.parent_locator.data_offset",
    );
    let mut long = good.clone();
    be32(&mut long, loc0 + 8, 1 << 30);
    fix_sums(&mut long);
    expect_corrupt(
        d,
        "locator longer than its space",
        &long,
        "header.parent_locator.data_len",
    );
    let mut on_bat = good.clone();
    be64(&mut on_bat, loc0 + 16, 1536);
    fix_sums(&mut on_bat);
    expect_corrupt(
        d,
        "locator on the BAT",
        &on_bat,
        "header.parent_locator.data_offset",
    );
    let mut code = good.clone();
    be32(&mut code, loc0, 0x1234_5678);
    fix_sums(&mut code);
    expect_corrupt(
        d,
        "unknown locator code",
        &code,
        "header.parent_locator.code",
    );
}

#[test]
fn corrupt_check_lists_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut b) = dynamic_image(tmp.path());
    be32(&mut b, 1536 + 4, 0x00ff_ffff);
    be32(&mut b, 1536 + 12, 0x00ff_fff0);
    let p = tmp.path().join("two.vhd");
    std::fs::write(&p, &b).unwrap();
    let problems = check(&open_file(&p, true).unwrap());
    assert_eq!(
        problems.iter().filter(|p| p.field == "bat").count(),
        2,
        "{problems:?}"
    );
}

#[test]
fn corrupt_single_byte_flips_in_metadata_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.vhd");
    create_path(&p, MIB, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    {
        let img = open(&p, false);
        for i in 0..6u64 {
            img.write_at(&pattern(i, 3000), i * 150_000 + 11).unwrap();
        }
    }
    let good = std::fs::read(&p).unwrap();
    let n = good.len();
    // Mutate in place: the first 4 KiB (footer copy, header, BAT, batmap)
    // and the footer, with and without fixed-up checksums.
    let (head, tail) = (good[..4096].to_vec(), good[n - 512..].to_vec());
    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let put = |h: &[u8], t: &[u8]| {
        use std::os::unix::fs::FileExt;
        file.write_all_at(h, 0).unwrap();
        file.write_all_at(t, (n - 512) as u64).unwrap();
    };
    let mut buf = vec![0u8; 65536];
    for i in 0..4096 + 512 {
        for (flip, fix) in [(0xffu8, false), (0x01, true), (0x80, true)] {
            let (mut h, mut t) = (head.clone(), tail.clone());
            if i < 4096 {
                h[i] ^= flip;
            } else {
                t[i - 4096] ^= flip;
            }
            if fix {
                fix_sums(&mut h[..512]);
                fix_sums(&mut h[..HDR + 1024]);
                fix_sums(&mut t);
            }
            put(&h, &t);
            let _ = check(&open_file(&p, true).unwrap());
            if let Ok(layer) = VhdLayer::open(
                Box::new(open_file(&p, true).unwrap()),
                "case",
                true,
                VhdOptions::default(),
            ) {
                let img = tapjail_worker::image::vhd::VhdImage::from_layers(vec![layer]).unwrap();
                let size = img.virtual_size();
                let len = (buf.len() as u64).min(size) as usize;
                let _ = img.read_at(&mut buf[..len], 0);
                let _ = img.read_at(&mut buf[..len], size - len as u64);
                let _ = img.block_status(0, size);
            }
        }
    }
    put(&head, &tail);
    assert_eq!(std::fs::read(&p).unwrap(), good);
}
