//! The offline tools never destroy a file they were not asked to create:
//! `create`, `snapshot` and `convert` write only new files, refuse a name
//! that exists (the source itself, a hard link to it, a parent of the
//! chain, any unrelated file), check their arguments before touching
//! anything, and remove what they created when they fail.

mod common;

use common::*;
use std::path::Path;
use tapjail_ctl::files::{convert_path, create_path, open_file, snapshot_path, ConvertTarget};
use tapjail_worker::image::vhd::create::{create, CreateKind};
use tapjail_worker::image::vhd::DEFAULT_BLOCK_SIZE;
use tapjail_worker::image::{Image, ImageError};

const MIB: u64 = 1 << 20;

/// A dynamic image at `p` holding a pattern at its start.
fn image_with_data(p: &Path) -> Vec<u8> {
    create_path(p, 2 * MIB, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    let img = open(p, false);
    img.write_at(&pattern(1, 100_000), 0).unwrap();
    img.flush().unwrap();
    drop(img);
    std::fs::read(p).unwrap()
}

fn assert_exists_error(e: &ImageError, what: &Path) {
    let msg = e.to_string();
    assert!(
        msg.contains("already exists") && msg.contains(&*what.to_string_lossy()),
        "{msg}"
    );
}

#[test]
fn create_path_existing_file_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("precious");
    std::fs::write(&p, b"precious data").unwrap();
    let e = create_path(&p, 2 * MIB, &CreateKind::dynamic()).unwrap_err();
    assert_exists_error(&e, &p);
    assert_eq!(std::fs::read(&p).unwrap(), b"precious data");
}

#[test]
fn create_bad_arguments_do_not_truncate_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f");
    std::fs::write(&p, b"precious data").unwrap();
    let f = open_file(&p, false).unwrap();
    for (size, kind) in [
        (2 * MIB, CreateKind::Dynamic { block_size: 3 }),
        (u64::MAX / 512 * 512, CreateKind::dynamic()),
        (
            tapjail_worker::image::vhd::MAX_VIRTUAL_SIZE,
            CreateKind::Dynamic { block_size: 4096 },
        ),
        (777, CreateKind::Fixed),
    ] {
        assert!(create(&f, size, &kind).is_err(), "{size} {kind:?}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious data", "{kind:?}");
    }
}

#[test]
fn create_path_failure_leaves_no_file_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("new.vhd");
    assert!(create_path(&p, 2 * MIB, &CreateKind::Dynamic { block_size: 3 }).is_err());
    assert!(!p.exists(), "a failed create left {} behind", p.display());
}

#[test]
fn convert_path_onto_its_own_source_is_refused_and_source_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a.vhd");
    let before = image_with_data(&src);
    let link = tmp.path().join("link.vhd");
    std::fs::hard_link(&src, &link).unwrap();
    for target in [
        ConvertTarget::Raw,
        ConvertTarget::VhdFixed,
        ConvertTarget::VhdDynamic {
            block_size: DEFAULT_BLOCK_SIZE,
        },
    ] {
        for dst in [&src, &link] {
            let e = convert_path(&src, dst, target, false, &mut |_, _| {}).unwrap_err();
            assert_exists_error(&e, dst);
            assert_eq!(std::fs::read(&src).unwrap(), before, "{target:?}");
        }
    }
}

#[test]
fn convert_path_onto_a_parent_of_the_source_is_refused_and_chain_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let before = image_with_data(&base);
    let child = tmp.path().join("child.vhd");
    snapshot_path(&child, &base, 65536).unwrap();
    let e = convert_path(&child, &base, ConvertTarget::Raw, false, &mut |_, _| {}).unwrap_err();
    assert_exists_error(&e, &base);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    assert_eq!(
        read_all(&open(&child, true))[..100_000],
        pattern(1, 100_000)
    );
}

#[test]
fn convert_path_failure_leaves_no_output_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a.vhd");
    image_with_data(&src);
    let dst = tmp.path().join("out.vhd");
    let bad = ConvertTarget::VhdDynamic { block_size: 3 };
    assert!(convert_path(&src, &dst, bad, false, &mut |_, _| {}).is_err());
    assert!(
        !dst.exists(),
        "a failed convert left {} behind",
        dst.display()
    );
}

#[test]
fn snapshot_path_onto_a_hard_link_of_its_parent_is_refused_and_parent_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let before = image_with_data(&base);
    let link = tmp.path().join("link.vhd");
    std::fs::hard_link(&base, &link).unwrap();
    let e = snapshot_path(&link, &base, 65536).unwrap_err();
    assert_exists_error(&e, &link);
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn snapshot_path_onto_a_grandparent_is_refused_and_chain_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let before = image_with_data(&base);
    let child = tmp.path().join("child.vhd");
    snapshot_path(&child, &base, 65536).unwrap();
    let e = snapshot_path(&base, &child, 65536).unwrap_err();
    assert_exists_error(&e, &base);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    assert_eq!(
        read_all(&open(&child, true))[..100_000],
        pattern(1, 100_000)
    );
}

#[test]
fn snapshot_path_of_itself_still_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    image_with_data(&base);
    let e = snapshot_path(&base, &base, 65536).unwrap_err();
    assert!(e.to_string().contains("cannot be its own parent"), "{e}");
}
