//! The fio writer the kill-the-worker tests run against a device.

use std::path::Path;
use std::process::{Command, Stdio};

/// fio writing `size` (fio syntax, e.g. `384M`) to `dev` with O_DIRECT at
/// depth 16 in 64 KiB blocks, each checksummed, then reading everything
/// back and verifying it: any write that failed, got lost or landed in
/// the wrong place fails fio. Output piped, terse.
pub fn fio_verify_writer(dev: &Path, size: &str) -> Command {
    let mut c = Command::new("fio");
    c.args([
        "--name=kill",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=write",
        "--bs=64k",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=terse",
    ])
    .arg(format!("--size={size}"))
    .arg(format!("--filename={}", dev.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}
