//! Interop with qemu (vpc format): images qemu writes read byte-identical
//! through our engine; images we write have exactly the size asked in
//! `qemu-img info` and read back identically through `qemu-img convert`;
//! a batmap qemu overwrote is detected, reported and dropped.

mod common;

use common::*;
use std::path::Path;
use tapjail_ctl::files::{check_path, create_path, repair_path};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::Image;

/// Writes qemu-io performs: (offset, length, pattern byte).
fn qemu_writes(size: u64) -> Vec<(u64, u64, u8)> {
    let mut w = vec![
        (0, 4096, 0x11),
        (size / 2 + 512, 70_000, 0x22),
        (size - 1024, 1024, 0x33),
    ];
    if size > 8 << 20 {
        w.push((3 << 20, 2 << 20, 0x44)); // spans a 2 MiB block boundary
        w.push((5 << 20, 1000, 0x55)); // unaligned length
    }
    w
}

fn fill_with_qemu(path: &Path, size: u64) {
    for (off, len, pat) in qemu_writes(size) {
        qemu_io(&[
            "-f",
            "vpc",
            "-c",
            &format!("write -P {pat} {off} {len}"),
            path.to_str().unwrap(),
        ]);
    }
}

#[test]
fn interop_qemu_written_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["dynamic", "fixed"] {
        for (size, force) in [
            ("1M", false),
            ("10M", false),
            ("64M", false),
            ("100M", false),
            ("3M", false),
            ("10M", true),
            ("33M", true),
        ] {
            let p = dir.path().join(format!("q-{subformat}-{size}-{force}.vhd"));
            let mut opts = format!("subformat={subformat}");
            if force {
                opts.push_str(",force_size=on");
            }
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &opts,
                p.to_str().unwrap(),
                size,
            ]);
            let qsize = qemu_virtual_size(&p);
            fill_with_qemu(&p, qsize);
            let img = open(&p, true);
            assert_eq!(img.virtual_size(), qsize, "{}", p.display());
            assert_eq!(read_all(&img), qemu_raw(&p, dir.path()), "{}", p.display());
            assert!(check_path(&p).unwrap().is_empty(), "{}", p.display());
        }
    }
}

#[test]
fn interop_our_images_have_exactly_the_size_asked_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for mib in [1u64, 7, 10, 100, 1000, 2049] {
        for (kind, tag) in [(CreateKind::dynamic(), "dyn"), (CreateKind::Fixed, "fixed")] {
            let p = dir.path().join(format!("{tag}-{mib}.vhd"));
            create_path(&p, mib << 20, &kind).unwrap();
            assert_eq!(qemu_virtual_size(&p), mib << 20, "{}", p.display());
            std::fs::remove_file(&p).unwrap();
        }
    }
}

fn write_model(img: &dyn Image, model: &mut [u8], writes: &[(u64, usize)]) {
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    img.flush().unwrap();
}

#[test]
fn interop_our_images_read_back_identically_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10u64 << 20;
    for (kind, tag) in [
        (CreateKind::dynamic(), "dyn"),
        (CreateKind::Fixed, "fixed"),
        (CreateKind::Dynamic { block_size: 65536 }, "dyn64k"),
    ] {
        let p = dir.path().join(format!("ours-{tag}.vhd"));
        create_path(&p, size, &kind).unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let img = open(&p, false);
            write_model(
                &img,
                &mut model,
                &[
                    (0, 4096),
                    (3 << 20, 100_000),
                    (1000, 3),
                    (size - 700, 700),
                    (9_000_001, 5),
                ],
            );
            // Discarding whole blocks deallocates them; qemu must see zeroes.
            img.discard(2 << 20, 4 << 20).unwrap();
            model[2 << 20..6 << 20].fill(0);
            img.flush().unwrap();
            assert_eq!(read_all(&img), model, "{tag}");
        }
        assert_eq!(qemu_virtual_size(&p), size);
        assert_eq!(qemu_raw(&p, dir.path()), model, "{tag}");
        assert!(check_path(&p).unwrap().is_empty(), "{tag}");
        assert_eq!(read_all(&open(&p, true)), model, "{tag}");
    }
}

/// Patch the creator application of both footers (checksums fixed up).
fn set_creator(path: &Path, app: &[u8; 4]) {
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    for off in [0, n - 512] {
        let f = &mut b[off..off + 512];
        f[28..32].copy_from_slice(app);
        f[64..68].fill(0);
        let sum = !f.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn interop_virtual_size_rule_matches_qemu_for_every_creator() {
    let dir = tempfile::tempdir().unwrap();
    // 10 MiB is not a CHS size, so the two rules give different sizes.
    for (i, app) in [
        b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"CTXS", b"tap\0", b"wa\0\0", b"xxxx",
        b"tap ", b"vpc\0",
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("w{i}.vhd"));
        create_path(&p, 10 << 20, &CreateKind::dynamic()).unwrap();
        set_creator(&p, app);
        let ours = open(&p, true).virtual_size();
        assert_eq!(ours, qemu_virtual_size(&p), "creator {app:?}");
    }
}

#[test]
fn interop_batmap_overwritten_by_qemu_is_ignored_reported_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tap.vhd");
    let size = 20u64 << 20;
    create_path(&p, size, &CreateKind::dynamic()).unwrap();
    assert!(check_path(&p).unwrap().is_empty());
    // qemu puts its first block right after the BAT: over our batmap.
    qemu_io(&[
        "-f",
        "vpc",
        "-c",
        "write -P 0x5a 4194304 1048576",
        p.to_str().unwrap(),
    ]);
    qemu_io(&[
        "-f",
        "vpc",
        "-c",
        "write -P 0x6b 12582912 4096",
        p.to_str().unwrap(),
    ]);
    let expected = qemu_raw(&p, dir.path());
    assert_eq!(read_all(&open(&p, true)), expected);

    let problems = check_path(&p).unwrap();
    assert!(
        problems.iter().any(|p| p.field == "batmap"),
        "check must report the batmap: {problems:?}"
    );
    let report = repair_path(&p).unwrap();
    assert!(
        report.actions.iter().any(|a| a.contains("batmap")),
        "{report:?}"
    );
    assert!(report.remaining.is_empty(), "{:?}", report.remaining);
    assert!(check_path(&p).unwrap().is_empty());
    assert_eq!(read_all(&open(&p, true)), expected);

    // And it stays writable by both.
    let mut model = expected;
    write_model(&open(&p, false), &mut model, &[(15 << 20, 9000)]);
    assert_eq!(qemu_raw(&p, dir.path()), model);
    assert!(check_path(&p).unwrap().is_empty());
}
