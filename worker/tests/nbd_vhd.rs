//! VHD images served by a confined tapdisk over NBD: holes visible to
//! `qemu-img map`, and differencing chains whose parents the privileged
//! monitor opens on the worker's behalf (beneath the leaf's directory only).

mod support;

use std::path::Path;
use std::process::Command;
use support::*;
use tapjail_ctl::files as vhdfs;
use tapjail_worker::image::vhd::{create::CreateKind, DEFAULT_BLOCK_SIZE};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dynamic_vhd(path: &Path, size: u64) {
    vhdfs::create_path(path, size, &CreateKind::dynamic()).unwrap();
}

#[test]
fn qemu_img_map_over_nbd_shows_the_holes_of_a_dynamic_vhd() {
    if !require(
        have("qemu-img") && have("qemu-io"),
        "qemu-img and qemu-io are not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhd");
    dynamic_vhd(&img, 64 * MIB);
    let srv = Standalone::start(dir.path(), &format!("vhd:{}", img.display()), &[]);
    let (ok, out) = qemu_io(&srv.url(), &["write -P 0x61 8M 1M", "read -P 0x61 8M 1M"]);
    assert!(ok, "{out}\n{}", srv.log());
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &srv.url()]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents = v.as_array().unwrap();
    let covers = |data: bool, at: u64| {
        extents.iter().any(|e| {
            let start = e["start"].as_u64().unwrap();
            let len = e["length"].as_u64().unwrap();
            e["data"].as_bool() == Some(data) && start <= at && at < start + len
        })
    };
    assert!(covers(true, 8 * MIB), "written range is data: {map}");
    assert!(covers(false, 0), "start of the disk is a hole: {map}");
    assert!(covers(false, 40 * MIB), "unwritten range is a hole: {map}");
    let hole = extents
        .iter()
        .find(|e| e["data"] == false)
        .unwrap_or_else(|| panic!("{map}"));
    assert_eq!(hole["zero"], true, "holes read as zero: {map}");
    // Discard gives the space back: the block becomes a hole again.
    let (ok, out) = qemu_io(&srv.url(), &["discard 8M 2M", "read -P 0 8M 1M"]);
    assert!(ok, "{out}");
}

#[test]
fn differencing_chain_writes_land_in_the_leaf_and_the_parent_is_unchanged() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base.vhd");
    let child = dir.path().join("leaf.vhd");
    dynamic_vhd(&parent, 16 * MIB);
    // Fill the parent with a pattern, offline, through qemu's own vpc driver.
    let out = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x11 0 4M"])
        .arg(&parent)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vhdfs::snapshot_path(&child, &parent, DEFAULT_BLOCK_SIZE).unwrap();
    let parent_before = std::fs::read(&parent).unwrap();

    let srv = Standalone::start(dir.path(), &format!("vhd:{}", child.display()), &[]);
    let (ok, out) = qemu_io(
        &srv.url(),
        &[
            "read -P 0x11 0 4M",     // through the leaf into the parent
            "write -P 0x22 1M 512k", // lands in the leaf
            "read -P 0x22 1M 512k",
            "read -P 0x11 0 1M", // rest of that block still from the parent
            "read -P 0x11 1536k 512k",
            "read -P 0 4M 4M", // beyond the parent's data: zeroes
            "flush",
        ],
    );
    assert!(ok, "{out}\n{}", srv.log());
    drop(srv);
    assert_eq!(
        std::fs::read(&parent).unwrap(),
        parent_before,
        "parent untouched"
    );
    // Offline, the leaf holds the new data and the parent the old.
    let out = Command::new("qemu-io")
        .args(["-f", "vpc", "-r", "-c", "read -P 0x11 1M 512k"])
        .arg(&parent)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("read 524288/524288"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    let leaf = tapjail_ctl::files::open_vhd(&child, true, Default::default()).unwrap();
    let mut buf = vec![0u8; 512 * 1024];
    tapjail_worker::image::Image::read_at(&leaf, &mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
}

#[test]
fn standalone_monitor_refuses_a_parent_outside_the_leaf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let parent = other.path().join("elsewhere.vhd");
    dynamic_vhd(&parent, 4 * MIB);
    let leafdir = dir.path().join("leaves");
    std::fs::create_dir(&leafdir).unwrap();
    let child = leafdir.join("leaf.vhd");
    // The child's locators point at ../../other/elsewhere.vhd and at the
    // absolute path: both outside the leaf's directory.
    vhdfs::snapshot_path(&child, &parent, DEFAULT_BLOCK_SIZE).unwrap();
    let out = Command::new(TAPDISK)
        .arg("--nbd")
        .arg(dir.path().join("s.sock"))
        .arg("-a")
        .arg(format!("vhd:{}", child.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("outside the image's directory"), "{err}");
    // The relative locator says which rule it broke, not the errno.
    assert!(
        err.contains("elsewhere.vhd leaves the image's directory"),
        "{err}"
    );
    assert!(!err.contains("cross-device"), "{err}");
}

#[test]
fn standalone_monitor_refuses_a_symlinked_parent_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base.vhd");
    dynamic_vhd(&parent, 4 * MIB);
    let child = dir.path().join("leaf.vhd");
    vhdfs::snapshot_path(&child, &parent, DEFAULT_BLOCK_SIZE).unwrap();
    // The parent is now a symlink (to a file in the same directory).
    std::fs::rename(&parent, dir.path().join("real.vhd")).unwrap();
    std::os::unix::fs::symlink("real.vhd", &parent).unwrap();
    let out = Command::new(TAPDISK)
        .arg("--nbd")
        .arg(dir.path().join("s.sock"))
        .arg("-a")
        .arg(format!("vhd:{}", child.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "parent path base.vhd is a symlink or passes through one; images and parents \
             must be regular files, symlinks are refused"
        ),
        "{err}"
    );
    assert!(!err.contains("symbolic links"), "{err}");
}

/// A child of a raw parent (`snapshot -m`) served standalone over NBD: the
/// monitor opens the raw file beneath the leaf's directory, the worker
/// serves it as the root of the chain, and writes stay in the child.
#[test]
fn raw_parent_chain_over_nbd_reads_the_raw_file_and_writes_the_child() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = raw_image(dir.path(), "base.raw", 8 << 20, 0x11);
    let child = dir.path().join("leaf.vhd");
    tapjail_ctl::raw_parent::snapshot_raw_in(
        &mut vhdfs::Local::default(),
        &child,
        &base,
        DEFAULT_BLOCK_SIZE,
    )
    .unwrap();
    let srv = Standalone::start(dir.path(), &format!("vhd:{}", child.display()), &[]);
    let (ok, out) = qemu_io(
        &srv.url(),
        &[
            "read -P 0x11 0 8M", // all of it from the raw parent
            "write -P 0x22 1M 512k",
            "read -P 0x22 1M 512k",
            "read -P 0x11 0 1M",
            "read -P 0x11 1536k 6656k",
            "flush",
        ],
    );
    assert!(ok, "{out}\n{}", srv.log());
    drop(srv);
    assert!(
        std::fs::read(&base).unwrap().iter().all(|&b| b == 0x11),
        "raw parent untouched"
    );
}
