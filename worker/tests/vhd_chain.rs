//! Differencing chains: relative and absolute parent locators, depth,
//! loops, UUID checks, coalesce and set-parent, and the ParentOpener
//! contract the broker implements.

mod common;

use common::*;
use std::path::Path;
use tapjail_common::proto::ImageKind;
use tapjail_ctl::files::{
    check_path, coalesce_path, create_path, open_file, open_vhd, set_parent_path, snapshot_path,
};
use tapjail_worker::image::vhd::create::{create, CreateKind, ParentSpec};
use tapjail_worker::image::vhd::locator::LocatorCode;
use tapjail_worker::image::vhd::{VhdOptions, DEFAULT_BLOCK_SIZE, MAX_CHAIN_DEPTH};
use tapjail_worker::image::{open_chain, Backing, Image, ImageError, ParentLocator, ParentOpener};

const MIB: u64 = 1 << 20;

fn write(img: &dyn Image, model: &mut [u8], off: u64, len: usize, seed: u64) {
    let d = pattern(seed, len);
    img.write_at(&d, off).unwrap();
    model[off as usize..off as usize + len].copy_from_slice(&d);
}

/// A child that records its parent only as `./base.vhd`, exactly as
/// blktap's vhd-util does (MacX, W2ku and W2ru all relative).
fn blktap_style_child(dir: &Path) {
    let base = open(&dir.join("base.vhd"), true);
    let uuid = base.leaf().uuid();
    let size = base.virtual_size();
    drop(base);
    let spec = ParentSpec {
        uuid,
        timestamp: 0,
        name: "base.vhd".into(),
        locators: vec![
            (LocatorCode::MacX, "./base.vhd".into()),
            (LocatorCode::W2ku, "./base.vhd".into()),
            (LocatorCode::W2ru, "./base.vhd".into()),
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
fn chain_relative_parent_resolves_against_the_childs_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir(&a).unwrap();
    create_path(&a.join("base.vhd"), 8 * MIB, &CreateKind::dynamic()).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    write(&open(&a.join("base.vhd"), false), &mut model, 100, 5000, 1);
    blktap_style_child(&a);
    write(&open(&a.join("child.vhd"), false), &mut model, 3000, 700, 2);

    // Move the whole directory: only the relative locator can still work.
    let b = tmp.path().join("moved");
    std::fs::rename(&a, &b).unwrap();
    let img = open(&b.join("child.vhd"), true);
    assert_eq!(img.layers().len(), 2);
    assert_eq!(read_all(&img), model);
    assert!(check_path(&b.join("child.vhd")).unwrap().is_empty());
    let locs = img.leaf().parent_locators();
    assert!(locs
        .iter()
        .all(|l| l.relative && l.path == "./base.vhd" || l.code == "name"));
}

#[test]
fn chain_snapshot_records_relative_and_absolute_locators() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    create_path(&base, 4 * MIB, &CreateKind::dynamic()).unwrap();
    std::fs::create_dir(tmp.path().join("kids")).unwrap();
    let child = tmp.path().join("kids/child.vhd");
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    // The parent is outside the child's directory: only named is it used.
    let mut named = tapjail_ctl::files::Local::default().with_parent(&child, &base);
    let img =
        tapjail_ctl::files::open_vhd_in(&mut named, &child, true, Default::default()).unwrap();
    let locs = img.leaf().parent_locators();
    assert!(locs
        .iter()
        .any(|l| l.code == "W2ru" && l.path == "./../base.vhd" && l.relative));
    let abs = std::path::absolute(&base).unwrap();
    assert!(locs
        .iter()
        .any(|l| l.code == "W2ku" && !l.relative && Path::new(&l.path) == abs));
    assert!(locs
        .iter()
        .any(|l| l.code == "MacX" && Path::new(&l.path) == abs));
}

#[test]
fn chain_of_depth_40_reads_writes_and_coalesces_like_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let mut model = vec![0u8; size as usize];
    let mut path = tmp.path().join("l0.vhd");
    create_path(&path, size, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    for i in 0..40u64 {
        {
            let img = open(&path, false);
            // Overlapping, unaligned writes so every layer shadows some.
            write(&img, &mut model, (i * 97_003) % (size - 9000), 9000, i + 10);
            img.flush().unwrap();
        }
        let next = tmp.path().join(format!("l{}.vhd", i + 1));
        snapshot_path(&next, &path, 65536).unwrap();
        path = next;
    }
    let img = open(&path, true);
    assert_eq!(img.layers().len(), 41);
    assert_eq!(read_all(&img), model);
    // block_status walks the chain: the start was written in l0 only.
    let e = img.block_status(0, size).unwrap();
    assert!(e.allocated);
    let hole = img.block_status(size - 4096, 4096).unwrap();
    assert!(!hole.allocated && hole.zero);
    drop(img);
    // Merge l39 (which holds the last write) into l38: l38's chain now
    // reads like the whole model, and the full chain still does.
    let l39 = tmp.path().join("l39.vhd");
    let (parent, copied) = coalesce_path(&l39, &mut |_, _| {}).unwrap();
    assert!(parent.ends_with("l38.vhd"));
    assert!(copied >= 9000);
    assert_eq!(read_all(&open(&tmp.path().join("l38.vhd"), true)), model);
    assert_eq!(read_all(&open(&path, true)), model);
}

#[test]
fn chain_deeper_than_the_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut path = tmp.path().join("l0.vhd");
    create_path(&path, MIB, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    for i in 0..MAX_CHAIN_DEPTH {
        let next = tmp.path().join(format!("l{}.vhd", i + 1));
        snapshot_path(&next, &path, 65536).unwrap();
        path = next;
    }
    let e = open_vhd(&path, true, VhdOptions::default()).unwrap_err();
    assert!(
        matches!(e, ImageError::ChainTooDeep { max, .. } if max == MAX_CHAIN_DEPTH),
        "{e}"
    );
}

#[test]
fn chain_parent_loop_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let y = tmp.path().join("y.vhd");
    let x = tmp.path().join("x.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&y, &base, DEFAULT_BLOCK_SIZE).unwrap();
    snapshot_path(&x, &y, DEFAULT_BLOCK_SIZE).unwrap();
    // x -> y -> x -> ...: set_parent_path refuses to write this, so
    // write it below that check (as another tool or a hostile image can).
    let (spec, _) = tapjail_ctl::files::parent_spec(&y, &x).unwrap();
    tapjail_worker::image::vhd::modify::set_parent(&open_file(&y, false).unwrap(), &spec).unwrap();
    let e = open_vhd(&x, true, VhdOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::ParentLoop { .. }), "{e}");
}

#[test]
fn chain_parent_with_another_uuid_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    // Replace the parent by another image (a new UUID) under its name.
    std::fs::remove_file(&base).unwrap();
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    let e = open_vhd(&child, true, VhdOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::ParentUuidMismatch { .. }), "{e}");
    assert!(check_path(&child)
        .unwrap()
        .iter()
        .any(|p| p.field == "parent"));
}

#[test]
fn chain_missing_parent_is_a_parent_error_and_set_parent_fixes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    create_path(&base, 2 * MIB, &CreateKind::dynamic()).unwrap();
    let mut model = vec![0u8; 2 * MIB as usize];
    write(&open(&base, false), &mut model, 0, 1000, 3);
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    write(&open(&child, false), &mut model, 500, 1000, 4);
    std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
    let moved = tmp
        .path()
        .join("elsewhere/a-much-longer-name-than-before-for-the-locators.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let e = open_vhd(&child, true, VhdOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::Parent(_)), "{e}");
    set_parent_path(&child, &moved).unwrap();
    assert_eq!(read_all(&open(&child, true)), model);
    assert!(check_path(&child).unwrap().is_empty());
}

/// A broker-like opener: records what it was asked and hands out files.
struct RecordingOpener {
    dir: std::path::PathBuf,
    asked: Vec<(String, Vec<ParentLocator>, [u8; 16])>,
}

impl ParentOpener for RecordingOpener {
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        self.asked
            .push((child.to_string(), locators.to_vec(), parent_uuid));
        let rel = locators.iter().find(|l| l.relative).unwrap();
        let p = self.dir.join(&rel.path);
        Ok((Box::new(open_file(&p, true)?), rel.path.clone()))
    }
}

#[test]
fn chain_open_chain_uses_the_parent_opener_with_locators_and_uuid() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let base_uuid = open(&base, true).leaf().uuid();
    let mut opener = RecordingOpener {
        dir: tmp.path().to_path_buf(),
        asked: Vec::new(),
    };
    let leaf = Box::new(open_file(&child, false).unwrap());
    let img = open_chain(ImageKind::Vhd, leaf, "child.vhd", false, &mut opener).unwrap();
    assert_eq!(img.stats().len(), 2);
    assert_eq!(img.stats()[1].name, "./base.vhd");
    assert_eq!(opener.asked.len(), 1);
    assert_eq!(opener.asked[0].0, "child.vhd");
    assert_eq!(opener.asked[0].2, base_uuid);
    img.write_at(b"abc", 7).unwrap();
    let mut b = [0u8; 4];
    img.read_at(&mut b, 6).unwrap();
    assert_eq!(&b, b"\0abc");
}

#[test]
fn set_parent_path_to_itself_is_refused_and_image_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let before = std::fs::read(&child).unwrap();
    let e = set_parent_path(&child, &child).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    assert_eq!(std::fs::read(&child).unwrap(), before);
    open_vhd(&child, true, VhdOptions::default()).unwrap();
}

#[test]
fn set_parent_path_onto_a_descendant_is_refused_and_chain_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let c1 = tmp.path().join("c1.vhd");
    let c2 = tmp.path().join("c2.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&c1, &base, DEFAULT_BLOCK_SIZE).unwrap();
    snapshot_path(&c2, &c1, DEFAULT_BLOCK_SIZE).unwrap();
    let before = std::fs::read(&c1).unwrap();
    let e = set_parent_path(&c1, &c2).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    assert_eq!(std::fs::read(&c1).unwrap(), before);
    open_vhd(&c2, true, VhdOptions::default()).unwrap();
}

#[test]
fn check_path_reports_a_parent_loop_further_up_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let c1 = tmp.path().join("c1.vhd");
    let c2 = tmp.path().join("c2.vhd");
    create_path(&base, MIB, &CreateKind::dynamic()).unwrap();
    snapshot_path(&c1, &base, DEFAULT_BLOCK_SIZE).unwrap();
    snapshot_path(&c2, &c1, DEFAULT_BLOCK_SIZE).unwrap();
    // A loop c1 -> c2 -> c1, written below the path-level refusal (as
    // another tool, or a hostile image, could have).
    let (spec, _) = tapjail_ctl::files::parent_spec(&c1, &c2).unwrap();
    tapjail_worker::image::vhd::modify::set_parent(&open_file(&c1, false).unwrap(), &spec).unwrap();
    assert!(open_vhd(&c2, true, VhdOptions::default()).is_err());
    for p in [&c1, &c2] {
        let problems = check_path(p).unwrap();
        assert!(
            problems.iter().any(|x| x.message.contains("loop")),
            "{}: {problems:?}",
            p.display()
        );
    }
}
