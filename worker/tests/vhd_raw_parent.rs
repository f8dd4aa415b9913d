//! Differencing VHDs whose parent is a raw file (`vhd-util snapshot -m`),
//! in the engine: the chain opener serves the raw file as the root layer,
//! reads fall through to it, writes stay in the child, and a raw parent
//! shorter than the child is refused.

mod common;

use common::*;
use std::path::Path;
use tapjail_ctl::files::{check_path, coalesce_path, open_vhd};
use tapjail_ctl::raw_parent::snapshot_raw_in;
use tapjail_worker::image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_worker::image::vhd::locator::LocatorCode;
use tapjail_worker::image::vhd::{VhdOptions, DEFAULT_BLOCK_SIZE};
use tapjail_worker::image::{Backing, Image, ImageError, ParentLocator, ParentOpener, Target};

const MIB: u64 = 1 << 20;

/// A raw file of `len` pattern bytes.
fn raw_base(dir: &Path, name: &str, len: u64, seed: u64) -> Vec<u8> {
    let data = pattern(seed, len as usize);
    std::fs::write(dir.join(name), &data).unwrap();
    data
}

/// A child of `./base.raw` exactly as libvhd's `vhd_snapshot` with
/// `VHD_FLAG_CREAT_PARENT_RAW` records it: null parent UUID, the parent's
/// file name, MacX, W2ku and W2ru locators in that order (relative, as
/// vhd-util writes them), virtual size = the raw file's size.
fn blktap_style_raw_child(dir: &Path, size: u64) {
    let spec = ParentSpec {
        uuid: [0; 16],
        timestamp: 12345,
        name: "base.raw".into(),
        locators: vec![
            (LocatorCode::MacX, "./base.raw".into()),
            (LocatorCode::W2ku, "./base.raw".into()),
            (LocatorCode::W2ru, "./base.raw".into()),
        ],
    };
    let f = std::fs::File::create_new(dir.join("child.vhd")).unwrap();
    create(
        &f,
        size,
        &CreateKind::Differencing {
            block_size: DEFAULT_BLOCK_SIZE,
            parent: spec,
        },
    )
    .unwrap();
}

#[test]
fn raw_parent_chain_reads_through_and_writes_stay_in_the_child() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut model = raw_base(d, "base.raw", 6 * MIB, 1);
    blktap_style_raw_child(d, 6 * MIB);
    {
        let img = open(&d.join("child.vhd"), false);
        assert_eq!(img.layers().len(), 2);
        assert!(img.layers()[1].is_raw() && img.leaf().parent_is_raw());
        assert_eq!(read_all(&img), model);
        // Unaligned, across a block boundary, and the last sector.
        for (off, len, seed) in [
            (2 * MIB - 700, 5000, 2),
            (6 * MIB - 512, 512, 3),
            (3, 10, 4),
        ] {
            let data = pattern(seed, len);
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        assert_eq!(read_all(&img), model);
        let stats = img.stats();
        assert_eq!(
            (stats[0].driver, stats[1].driver),
            ("vhd", "aio"),
            "blktap's driver names"
        );
        assert!(stats[1].hits[0] > 0 && stats[1].hits[1] == 0);
        // Raw data is allocated data, whatever its bytes.
        let e = img.block_status(4 * MIB, 4096).unwrap();
        assert!(e.allocated && !e.zero);
    }
    assert_eq!(
        std::fs::read(d.join("base.raw")).unwrap(),
        pattern(1, 6 * MIB as usize),
        "the raw parent is never written"
    );
    assert_eq!(read_all(&open(&d.join("child.vhd"), true)), model);
    assert!(check_path(&d.join("child.vhd")).unwrap().is_empty());
}

#[test]
fn raw_parent_reads_map_directly_into_the_raw_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = raw_base(d, "base.raw", 4 * MIB, 5);
    blktap_style_raw_child(d, 4 * MIB);
    let img = open(&d.join("child.vhd"), true);
    assert_eq!(img.direct_files().len(), 2);
    let m = img.map_direct(MIB, 8192, false).expect("a read maps");
    assert!(m
        .segments()
        .iter()
        .all(|s| matches!(s.target, Target::File { file: 1, .. })));
    assert_eq!(
        m.segments()[0].target,
        Target::File {
            file: 1,
            offset: MIB
        },
        "raw parent bytes sit at their own offset"
    );
    let mut buf = vec![0u8; 8192];
    img.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf[..], base[MIB as usize..MIB as usize + 8192]);
}

#[test]
fn raw_parent_shorter_than_the_child_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    raw_base(d, "base.raw", 4 * MIB, 6);
    blktap_style_raw_child(d, 4 * MIB);
    std::fs::File::options()
        .write(true)
        .open(d.join("base.raw"))
        .unwrap()
        .set_len(4 * MIB - 512)
        .unwrap();
    let e = open_vhd(&d.join("child.vhd"), true, VhdOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::Parent(_)), "{e:?}");
    assert!(
        msg.contains("base.raw")
            && msg
                .contains("4193792 bytes, smaller than the child's virtual size of 4194304 bytes"),
        "{msg}"
    );
}

/// What the broker sees: a request with a null parent UUID, answered
/// with the raw file.
#[derive(Default)]
struct Recording(Vec<[u8; 16]>);

impl ParentOpener for Recording {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        self.0.push(parent_uuid);
        let dir = Path::new(child).parent().unwrap();
        let l = locators.iter().find(|l| l.relative).unwrap();
        let p = dir.join(&l.path);
        let f = std::fs::File::open(&p).unwrap();
        Ok((Box::new(f), p.to_string_lossy().into_owned()))
    }
}

#[test]
fn raw_parent_is_asked_for_with_a_null_uuid_and_ends_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = raw_base(d, "base.raw", 4 * MIB, 7);
    blktap_style_raw_child(d, 4 * MIB);
    // A VHD child of the raw parent's child: three layers.
    tapjail_ctl::files::snapshot_path(
        &d.join("grandchild.vhd"),
        &d.join("child.vhd"),
        DEFAULT_BLOCK_SIZE,
    )
    .unwrap();
    let leaf = d.join("grandchild.vhd");
    let mut rec = Recording::default();
    let img = tapjail_worker::image::vhd::open(
        Box::new(std::fs::File::open(&leaf).unwrap()),
        &leaf.to_string_lossy(),
        true,
        &mut rec,
        VhdOptions::default(),
    )
    .unwrap();
    assert_eq!(rec.0.len(), 2);
    assert_ne!(rec.0[0], [0; 16], "the VHD parent is asked for by UUID");
    assert_eq!(rec.0[1], [0; 16], "the raw parent: null UUID");
    assert_eq!(img.layers().len(), 3);
    assert_eq!(read_all(&img), base);
}

#[test]
fn raw_parent_snapshot_records_what_libvhd_records() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    raw_base(d, "disk.raw", 3 * MIB, 8);
    let child = d.join("kid.vhd");
    let mut local = tapjail_ctl::files::Local::default();
    snapshot_raw_in(&mut local, &child, &d.join("disk.raw"), DEFAULT_BLOCK_SIZE).unwrap();
    let img = open(&child, true);
    let leaf = img.leaf();
    assert_eq!(leaf.virtual_size(), 3 * MIB, "as large as the raw file");
    let h = leaf.header().unwrap();
    assert_eq!(h.parent_uuid(), [0; 16]);
    assert_eq!(h.parent_name().as_deref(), Some("disk.raw"));
    let mtime = std::fs::metadata(d.join("disk.raw"))
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(u64::from(h.parent_timestamp()), mtime - 946_684_800);
    let codes: Vec<_> = leaf
        .parent_locators()
        .iter()
        .map(|l| l.code.clone())
        .collect();
    for c in ["W2ru", "W2ku", "MacX"] {
        assert!(codes.iter().any(|x| x == c), "{codes:?}");
    }
    assert_eq!(read_all(&img), pattern(8, 3 * MIB as usize));
}

#[test]
fn raw_parent_coalesce_writes_the_childs_sectors_into_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut model = raw_base(d, "base.raw", 4 * MIB, 9);
    blktap_style_raw_child(d, 4 * MIB);
    {
        let img = open(&d.join("child.vhd"), false);
        let data = pattern(10, 70_000);
        img.write_at(&data, MIB + 100).unwrap();
        model[(MIB + 100) as usize..(MIB + 100) as usize + data.len()].copy_from_slice(&data);
        img.flush().unwrap();
    }
    let (parent, copied) = coalesce_path(&d.join("child.vhd"), &mut |_, _| {}).unwrap();
    assert!(parent.ends_with("base.raw"), "{parent}");
    assert_eq!(copied, 70_144, "whole sectors the child holds");
    assert_eq!(std::fs::read(d.join("base.raw")).unwrap(), model);
    assert_eq!(
        std::fs::metadata(d.join("base.raw")).unwrap().len(),
        4 * MIB
    );
}

#[test]
fn raw_parent_that_is_a_vhd_is_refused_not_served_as_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    blktap_style_raw_child(d, 4 * MIB);
    tapjail_ctl::files::create_path(&d.join("base.raw"), 8 * MIB, &CreateKind::dynamic()).unwrap();
    let e = open_vhd(&d.join("child.vhd"), true, VhdOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("recorded as the raw parent") && msg.contains("it is a VHD, not a raw image"),
        "{msg}"
    );
}
