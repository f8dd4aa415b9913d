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

/// A running fio that writes `size` at random 4 KiB offsets with O_DIRECT
/// at depth 16 (allocating VHD blocks as it goes), then reads everything
/// back and checks each block's crc32c; its JSON report goes to a file.
/// The writer the kill-under-load tests (worker or broker) run.
#[derive(Debug)]
pub struct RandomVerifyWriter {
    child: std::process::Child,
    report: std::path::PathBuf,
    size: u64,
}

impl RandomVerifyWriter {
    /// Start it on `dev`; `rate_iops` paces it so that it lasts across
    /// slow events (a broker restart), `report` is where fio's JSON goes.
    pub fn spawn(dev: &Path, size_mib: u64, rate_iops: Option<u32>, report: &Path) -> Self {
        let mut c = Command::new("fio");
        c.args([
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=0",
            "--eta=never",
            "--output-format=json",
        ])
        .arg(format!("--size={size_mib}M"))
        .arg(format!("--filename={}", dev.display()))
        .arg(format!("--output={}", report.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if let Some(r) = rate_iops {
            c.arg(format!("--rate_iops={r}"));
        }
        let child = c
            .spawn()
            .expect("fio (apt-get install fio; nestvm's guest shares the host's root)");
        RandomVerifyWriter {
            child,
            report: report.to_path_buf(),
            size: size_mib << 20,
        }
    }

    /// Still writing or verifying (a kill test acts only while it runs).
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("fio wait").is_none()
    }

    /// Wait for the end and assert that fio wrote and verified everything
    /// with no error. `context` (e.g. the broker log) goes into failures.
    pub fn finish(mut self, context: &str) {
        let status = self.child.wait().expect("fio wait");
        let report = std::fs::read_to_string(&self.report).unwrap_or_default();
        assert!(status.success(), "fio failed: {report}\n{context}");
        let v: serde_json::Value = serde_json::from_str(&report).expect("fio json");
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "fio saw an I/O error: {job}\n{context}");
        let bytes = |dir: &str| job[dir]["io_bytes"].as_u64().unwrap_or(0);
        assert!(bytes("write") >= self.size, "everything written: {job}");
        assert!(
            bytes("read") >= self.size,
            "everything read back and verified: {job}"
        );
    }
}
