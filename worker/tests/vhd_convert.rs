//! `convert`: every source kind (dynamic, fixed, differencing chains with
//! partially written blocks, raw, images written by qemu) converts to a
//! byte-identical output, and data that reads as zero stays a hole.
//! The images span several of the converter's chunks, with runs that cross
//! chunk and block boundaries.

mod common;

use common::*;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use tapjail_ctl::files::{convert_path, create_path, snapshot_path, ConvertTarget};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::DEFAULT_BLOCK_SIZE;
use tapjail_worker::image::Image;

const MIB: u64 = 1 << 20;

fn write(img: &dyn Image, model: &mut [u8], off: u64, data: &[u8]) {
    img.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn convert(src: &Path, dst: &Path, target: ConvertTarget) {
    convert_path(src, dst, target, false, &mut |_, _| {}).unwrap();
}

/// `lseek(SEEK_DATA or SEEK_HOLE)`; None past the end of the file.
fn seek(f: &File, from: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek takes plain integers; the fd is open for the call.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    u64::try_from(r).ok()
}

/// The data ranges of a file as the filesystem reports them, or None when
/// it does not report holes (then sparseness cannot be checked).
fn data_ranges(path: &Path) -> Option<Vec<(u64, u64)>> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(start) = seek(&f, pos, libc::SEEK_DATA) {
        let end = seek(&f, start, libc::SEEK_HOLE).unwrap_or(len);
        out.push((start, end));
        pos = end;
    }
    (out != [(0, len)]).then_some(out)
}

fn is_hole(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    ranges.iter().all(|&(s, e)| e <= from || s >= to)
}

fn is_data(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    ranges.iter().any(|&(s, e)| s <= from && e >= to)
}

#[test]
fn convert_differencing_chain_with_partial_blocks_to_raw_is_byte_identical_and_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    let size = 16 * MIB;
    create_path(&base, size, &CreateKind::dynamic()).unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let b = open(&base, false);
        // Crosses a block boundary (2 MiB) and several converter chunks.
        write(&b, &mut model, MIB, &pattern(1, 3 * MIB as usize));
        // Partial sectors at both ends.
        write(&b, &mut model, 9 * MIB + 333, &pattern(2, 100));
    }
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    {
        let c = open(&child, false);
        // Partly written leaf block over the parent's data: the leaf's
        // sector bitmap decides sector by sector.
        write(&c, &mut model, MIB + 7, &pattern(3, 5000));
        // Zeroes written over the parent's data: must read (and convert)
        // as zero, and need not be stored.
        write(&c, &mut model, 2 * MIB, &[0u8; 64 << 10]);
        // A leaf block whose parent block is a hole.
        write(&c, &mut model, 12 * MIB + 3 * 4096 + 1, &pattern(4, 10_000));
    }
    let chain = open(&child, true);
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(read_all(&chain), model, "the chain itself reads the model");

    let raw = tmp.path().join("out.raw");
    convert(&child, &raw, ConvertTarget::Raw);
    let out = std::fs::read(&raw).unwrap();
    assert_eq!(out.len() as u64, size);
    assert!(out == model, "converted bytes differ from the chain's");

    if let Some(r) = data_ranges(&raw) {
        assert!(is_data(&r, MIB, 2 * MIB), "{r:?}");
        assert!(is_data(&r, 2 * MIB + (64 << 10), 4 * MIB), "{r:?}");
        assert!(is_hole(&r, 2 * MIB, 2 * MIB + (64 << 10)), "zeroes: {r:?}");
        assert!(is_hole(&r, 0, MIB), "never written: {r:?}");
        assert!(is_hole(&r, 13 * MIB, size), "never written: {r:?}");
        // The zero bytes around the partial writes in the leaf-only block
        // are whole zero grains, holes too.
        assert!(is_hole(&r, 12 * MIB, 12 * MIB + 3 * 4096), "{r:?}");
    }
}

#[test]
fn convert_raw_to_dynamic_and_fixed_vhd_and_back_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 10 * MIB;
    let mut model = vec![0u8; size as usize];
    // Data in blocks 0, 1 (crossing their boundary) and 4; blocks 2, 3
    // hold only zeroes.
    model[MIB as usize + 5..3 * MIB as usize - 5]
        .copy_from_slice(&pattern(5, 2 * MIB as usize - 10));
    model[8 * MIB as usize + 4096..8 * MIB as usize + 8192].copy_from_slice(&pattern(6, 4096));
    let raw = tmp.path().join("in.raw");
    std::fs::write(&raw, &model).unwrap();

    let dynamic = tmp.path().join("d.vhd");
    convert(
        &raw,
        &dynamic,
        ConvertTarget::VhdDynamic {
            block_size: DEFAULT_BLOCK_SIZE,
        },
    );
    let d = open(&dynamic, true);
    assert_eq!(read_all(&d), model);
    // Only blocks with non-zero data are allocated.
    assert_eq!(d.leaf().allocated_blocks(), 3);

    let fixed = tmp.path().join("f.vhd");
    convert(&dynamic, &fixed, ConvertTarget::VhdFixed);
    assert_eq!(read_all(&open(&fixed, true)), model);

    let back = tmp.path().join("back.raw");
    convert(&fixed, &back, ConvertTarget::Raw);
    assert!(std::fs::read(&back).unwrap() == model);
}

#[test]
fn convert_qemu_written_dynamic_vhd_to_raw_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("q.vhd");
    let p = img.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        p,
        "12M",
    ]);
    // qemu allocates whole blocks and marks every sector present: the rest
    // of a partly written block reads (and converts) as zero.
    qemu_io(&[
        "-f",
        "vpc",
        "-c",
        "write -P 0x11 0 3M",
        "-c",
        "write -P 0x22 5000k 12k",
        "-c",
        "write -P 0x33 9M 512",
        p,
    ]);
    let raw = tmp.path().join("ours.raw");
    convert(&img, &raw, ConvertTarget::Raw);
    let ours = std::fs::read(&raw).unwrap();
    let theirs = qemu_raw(&img, tmp.path());
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "our conversion differs from qemu-img's");
    if let Some(r) = data_ranges(&raw) {
        // qemu's zero-filled rest of the block at 9 MiB is not stored.
        assert!(is_hole(&r, 9 * MIB + 4096, 10 * MIB), "{r:?}");
        assert!(is_data(&r, 0, 3 * MIB), "{r:?}");
    }
}
