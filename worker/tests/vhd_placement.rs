//! Where new data blocks go: as libvhd and tapdisk place them, with the
//! data area (after the sector bitmap) on a 4 KiB boundary of the file, so
//! direct I/O on 4K-native disks stays aligned. Blocks an image already
//! has (qemu's, or an older tapjail's) stay where they are.

mod common;

use common::*;
use std::path::Path;
use tapjail_ctl::files::{check_path, create_path};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::layer::aligned_block_start;
use tapjail_worker::image::Image;

const MIB: u64 = 1 << 20;

/// Where each allocated block's data area starts, from the BAT of a VHD
/// made by tapjail or qemu (both put the dynamic header at 512).
fn data_offsets(path: &Path) -> Vec<u64> {
    let b = std::fs::read(path).unwrap();
    let h = &b[512..1536];
    let table = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
    let n = u32::from_be_bytes(h[28..32].try_into().unwrap()) as usize;
    let block = u64::from(u32::from_be_bytes(h[32..36].try_into().unwrap()));
    let bitmap = (block / 512 / 8).next_multiple_of(512);
    (0..n)
        .map(|i| u32::from_be_bytes(b[table + 4 * i..table + 4 * i + 4].try_into().unwrap()))
        .filter(|&e| e != u32::MAX)
        .map(|e| u64::from(e) * 512 + bitmap)
        .collect()
}

#[test]
fn placement_aligned_start_is_libvhds_gap_rule() {
    // libvhd: the first sector s >= end with (s + bm_secs) % 8 == 0.
    for end_sec in 0..64u64 {
        for bm in [512u64, 1024, 4096] {
            let s = aligned_block_start(end_sec * 512, bm).unwrap();
            let bm_secs = bm / 512;
            let want = (end_sec..).find(|x| (x + bm_secs) % 8 == 0).unwrap() * 512;
            assert_eq!(s, want, "end {end_sec} bitmap {bm}");
        }
    }
    assert_eq!(aligned_block_start(u64::MAX - 100, 512), None);
}

#[test]
fn placement_new_blocks_have_4k_aligned_data_and_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for block_size in [2 * MIB as u32, 512 << 10, 4 << 20] {
        let p = dir.path().join(format!("t{block_size}.vhd"));
        create_path(&p, 20 * MIB, &CreateKind::Dynamic { block_size }).unwrap();
        let img = open(&p, false);
        let writes = [
            (0u64, 4096usize, 1u64),
            (5 * MIB + 512, 70_000, 2),
            (19 * MIB, 4096, 3),
        ];
        for &(off, len, seed) in &writes {
            img.write_at(&pattern(seed, len), off).unwrap();
        }
        img.flush().unwrap();
        drop(img);
        let offs = data_offsets(&p);
        assert!(offs.len() >= 3, "{offs:?}");
        for o in &offs {
            assert_eq!(o % 4096, 0, "block {block_size}: data at {o} ({offs:?})");
        }
        assert!(check_path(&p).unwrap().is_empty());
        let raw = qemu_raw(&p, dir.path());
        for &(off, len, seed) in &writes {
            assert_eq!(
                &raw[off as usize..off as usize + len],
                &pattern(seed, len)[..]
            );
        }
    }
}

#[test]
fn placement_unaligned_blocks_of_a_qemu_image_stay_and_new_ones_are_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", p.to_str().unwrap(), "10M"]);
    qemu_io(&[
        "-f",
        "vpc",
        "-c",
        "write -P 0x61 0 4096",
        p.to_str().unwrap(),
    ]);
    let before = data_offsets(&p);
    assert_eq!(before.len(), 1);
    // qemu puts its first block right after the BAT: not aligned.
    assert_ne!(before[0] % 4096, 0, "qemu changed placement: {before:?}");
    let img = open(&p, false);
    img.write_at(&pattern(9, 4096), 4 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let after = data_offsets(&p);
    assert_eq!(after.len(), 2);
    assert!(after.contains(&before[0]), "{before:?} -> {after:?}");
    let new = after.iter().find(|&&o| o != before[0]).unwrap();
    assert_eq!(new % 4096, 0, "{after:?}");
    let raw = qemu_raw(&p, dir.path());
    assert!(raw[..4096].iter().all(|&b| b == 0x61));
    assert_eq!(
        &raw[4 * MIB as usize..4 * MIB as usize + 4096],
        &pattern(9, 4096)[..]
    );
    assert!(check_path(&p).unwrap().is_empty());
}
