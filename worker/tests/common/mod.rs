//! Helpers shared by the VHD engine tests: qemu tools, deterministic
//! patterns, opening images by path.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tapjail_worker::image::vhd::{VhdImage, VhdOptions};
use tapjail_worker::image::Image;

/// Run a command and return its stdout; panic with its stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}); install qemu-utils"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

pub fn qemu_io(args: &[&str]) -> String {
    run("qemu-io", args)
}

/// `qemu-img info` virtual size in bytes.
pub fn qemu_virtual_size(path: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", "-f", "vpc", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// qemu's view of the image as raw bytes.
pub fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

/// `len` deterministic bytes for `seed` (the shared test pattern, with
/// the seed first as these tests have always called it).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    tapjail_testsupport::pattern(len, seed)
}

pub fn open(path: &Path, read_only: bool) -> VhdImage {
    tapjail_ctl::files::open_vhd(path, read_only, VhdOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

pub fn open_dyn(path: &Path, read_only: bool) -> Arc<dyn Image> {
    Arc::new(open(path, read_only))
}

pub fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut b = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut b, 0).unwrap();
    b
}
