//! What the online coalesce tests share: a data pattern, device writes
//! mirrored into a model, a direct read-back and the offline checks of
//! the merged file.
#![allow(dead_code)] // each test binary uses part of it

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use tapjail_tests::*;

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[i % 4] ^ seed)
        .collect()
}

/// Write through the device, durably.
pub fn write_dev(dev: &Path, off: usize, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .expect("open device");
    f.write_all_at(data, off as u64).expect("write device");
    f.sync_all().expect("fsync device");
}

pub fn write(dev: &Path, model: &mut [u8], off: usize, data: &[u8]) {
    write_dev(dev, off, data);
    model[off..off + data.len()].copy_from_slice(data);
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole device, read past the page cache.
pub fn read_back(dev: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("readback.raw");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", dev.display()))
            .arg(format!("of={}", out.display()))
            .args(["bs=1M", "iflag=direct", "status=none"]),
    );
    fs::read(out).expect("read back")
}

/// After a merge: `tap-ctl vhd check` passes on the merged file and
/// qemu-img reads it as the model (qemu-img has no check for vpc).
pub fn check_merged_offline(merged: &Path, dir: &Path, model: &[u8]) {
    let raw = dir.join("model.raw");
    fs::write(&raw, model).unwrap();
    run_ok(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "check", "-n"])
            .arg(merged),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(merged)
            .arg(&raw),
    );
}
