//! The batmap is a hint, verified on first use of a block: a child whose
//! batmap claims a block is fully written when its sector bitmap says
//! otherwise is served with the parent's data showing through, and a
//! write never makes the bogus bit permanent.

mod common;

use common::*;
use std::path::Path;
use tapjail_ctl::files::{check_path, create_path, snapshot_path};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::DEFAULT_BLOCK_SIZE;
use tapjail_worker::image::Image;

const MIB: u64 = 1 << 20;

/// Compare without printing megabytes: the first differing offset.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Set the batmap bit of `block` in `p` with the batmap checksum fixed up
/// (blktap 1.2: one's complement of the byte sum over the first sector of
/// the map for disks up to 8 GiB), as a crafted or buggy writer would.
fn forge_full_bit(p: &Path, block: usize) {
    let mut b = std::fs::read(p).unwrap();
    let hdr = (0..b.len() / 512)
        .map(|i| i * 512)
        .find(|&o| &b[o..o + 8] == b"tdbatmap")
        .unwrap();
    let map = u64::from_be_bytes(b[hdr + 8..hdr + 16].try_into().unwrap()) as usize;
    b[map + block / 8] |= 0x80 >> (block % 8);
    let sum = !b[map..map + 512]
        .iter()
        .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    b[hdr + 24..hdr + 28].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(p, &b).unwrap();
}

#[test]
fn batmap_bit_that_the_bitmap_contradicts_is_not_trusted_and_a_write_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create_path(&base, 8 * MIB, &CreateKind::dynamic()).unwrap();
    let parent_data = pattern(1, 8 * MIB as usize);
    let img = open(&base, false);
    img.write_at(&parent_data, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let mut model = parent_data.clone();
    let img = open(&child, false);
    let own = pattern(2, 4096);
    img.write_at(&own, 8192).unwrap();
    img.flush().unwrap();
    drop(img);
    model[8192..8192 + 4096].copy_from_slice(&own);

    forge_full_bit(&child, 0);
    assert!(
        check_path(&child)
            .unwrap()
            .iter()
            .any(|p| p.field == "batmap"),
        "check must flag the forged bit"
    );

    // Read-only, as the chain's parent or a `read` would open it.
    let img = open(&child, true);
    same(&read_all(&img), &model, "read-only open");
    drop(img);

    // A write into the block: served right, and the bogus bit is gone.
    let img = open(&child, false);
    let more = pattern(3, 4096);
    img.write_at(&more, MIB).unwrap();
    model[MIB as usize..MIB as usize + 4096].copy_from_slice(&more);
    same(&read_all(&img), &model, "after a write");
    img.flush().unwrap();
    drop(img);
    assert_eq!(check_path(&child).unwrap(), vec![]);
    same(&read_all(&open(&child, true)), &model, "reopened");
}

#[test]
fn batmap_bits_that_are_right_keep_serving_and_checking_clean() {
    // A truthful batmap keeps working: blocks written in full are full
    // after reopening, and the image checks clean.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    create_path(&p, 8 * MIB, &CreateKind::dynamic()).unwrap();
    let data = pattern(4, 4 * MIB as usize);
    let img = open(&p, false);
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open(&p, false);
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, 0).unwrap();
    same(&got, &data, "full blocks");
    img.write_at(&pattern(5, 512), 512).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_eq!(check_path(&p).unwrap(), vec![]);
}
