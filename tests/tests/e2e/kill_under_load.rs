//! What the end-to-end tests of the kernel block-device frontends (ublk,
//! nbd-kernel) share: `list` and `stats` reading, a filesystem's round
//! trip, a read-only device, and the two kill scenarios each frontend must
//! survive under a verifying writer, a worker SIGKILL (respawn) and a
//! broker SIGKILL (adoption). Not a test module of its own: `ublk` and
//! `nbd_kernel` call it with their device.

use crate::*;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tapjail_testsupport::{tasks_in_d_state, RandomVerifyWriter};

/// `tap-ctl list --json` as tenant `t`.
pub fn rows(h: &Harness, t: &TenantSpec) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&h.ok(t, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Write requests tapdisk `pid` (minor 0's) has completed, from `stats`.
pub fn writes(h: &Harness, pid: u32) -> u64 {
    let out = h.ok(&ALICE, &["stats", "-m", "0", "-p", &pid.to_string()]);
    let s: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    s["images"][0]["hits"][1].as_u64().expect("write hits")
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a worker pid this test created through the broker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// ext4 made on `dev`, a 3 MiB file written to it, unmounted and mounted
/// again: the file reads back. Left mounted at `mnt`; returns the file.
pub fn ext4_file_survives_a_remount(dev: &Path, mnt: &Path) -> Vec<u8> {
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev));
    run(Command::new("mount").arg(dev).arg(mnt));
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(mnt.join("data"), &data).unwrap();
    run(Command::new("umount").arg(mnt));
    run(Command::new("mount").arg(dev).arg(mnt));
    assert!(
        std::fs::read(mnt.join("data")).unwrap() == data,
        "the file does not survive the remount"
    );
    data
}

/// Mount `dev` at `mnt`: the file [`ext4_file_survives_a_remount`] wrote
/// holds `data`; unmount.
pub fn ext4_file_holds(dev: &Path, mnt: &Path, data: &[u8]) {
    run(Command::new("mount").arg(dev).arg(mnt));
    assert!(std::fs::read(mnt.join("data")).unwrap() == data);
    run(Command::new("umount").arg(mnt));
}

/// A raw image of 4 MiB whose first 4 KiB are 0xa5, for a read-only disk.
pub fn raw_a5_image(h: &Harness) -> std::path::PathBuf {
    let img = h.raw_image("alice", "ro.img", 4 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0xa5; 4096], 0)
        .unwrap();
    img
}

/// On the read-only device `dev` over [`raw_a5_image`] `img`: an O_DIRECT
/// write fails, reads still work, and the image is unchanged.
pub fn read_only_device_refuses_writes(dev: &Path, img: &Path) {
    let write = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .and_then(|f| f.write_all_at(tapjail_testsupport::Aligned::new(4096).buf(), 0));
    assert!(write.is_err(), "a write to a read-only disk must fail");
    let mut back = vec![0u8; 4096];
    for (what, path) in [("reads still work", dev), ("image unchanged", img)] {
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0xa5), "{what}");
    }
}

/// `tap-ctl vhd check` passes on `img`.
pub fn vhd_check(img: &Path) {
    run(Command::new(bin("tap-ctl"))
        .args(["vhd", "check", "-n"])
        .arg(img));
}

fn worker_pid(h: &Harness) -> u32 {
    rows(h, &ALICE)[0]["pid"].as_u64().unwrap() as u32
}

/// Wait until tapdisk `pid` has completed writes since now (the event
/// that says I/O is in flight), and fio still runs.
fn wait_for_write_progress(h: &Harness, pid: u32, writer: &mut RandomVerifyWriter, what: &str) {
    let w0 = writes(h, pid);
    assert!(
        eventually(Duration::from_secs(120), || writes(h, pid) >= w0 + 64),
        "{what}: no write progress\n{}",
        h.broker_log()
    );
    assert!(writer.running(), "fio finished before {what}");
}

/// Alice's minor 0 (on `dev`, respawn on) under 48 MiB of verified random
/// writes: its worker is SIGKILLed three times mid-I/O; each time a new
/// one takes over (`after_each` checks the frontend's side of that), and
/// fio sees no error. Each replacement is audited; no task is left in D.
pub fn worker_sigkilled_three_times_under_a_verifying_writer(
    h: &Harness,
    dev: &Path,
    after_each: impl Fn(&Harness),
) {
    let mut writer = RandomVerifyWriter::spawn(dev, 48, None, &h.dir.path().join("fio.json"));
    let mut last_pid = worker_pid(h);
    for round in 1..=3u64 {
        wait_for_write_progress(h, last_pid, &mut writer, &format!("kill {round}"));
        sigkill(last_pid);
        let t0 = Instant::now();
        assert!(
            eventually(Duration::from_secs(120), || {
                let r = rows(h, &ALICE);
                r.len() == 1 && r[0]["restarts"] == round && r[0]["state"] == 0
            }),
            "round {round}: {:?}\n{}\naudit: {:#?}",
            rows(h, &ALICE),
            h.broker_log(),
            h.audit_lines().iter().rev().take(6).collect::<Vec<_>>()
        );
        let pid = worker_pid(h);
        assert_ne!(pid, last_pid);
        last_pid = pid;
        after_each(h);
        eprintln!(
            "kill {round}: replaced by tapdisk {pid} in {} ms",
            t0.elapsed().as_millis()
        );
    }
    writer.finish(&h.broker_log());
    assert!(tasks_in_d_state().is_empty(), "{:?}", tasks_in_d_state());
    let respawns = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "worker_respawn" && l["rule"] == "respawn")
        .count();
    assert_eq!(respawns, 3, "each replacement is audited");
}

/// Alice's minor 0 (on `dev`) under 32 MiB of verified random writes,
/// paced at `rate_iops` so that it lasts: the broker is SIGKILLed three
/// times; the worker and the device carry on without it
/// (`while_no_broker` checks the frontend's side), the next broker adopts
/// them with `list` unchanged, and fio sees no error. Each adoption is
/// audited and the worker never respawned.
pub fn broker_sigkilled_three_times_under_a_verifying_writer(
    h: &mut Harness,
    dev: &Path,
    rate_iops: u32,
    while_no_broker: impl Fn(),
) {
    let mut writer =
        RandomVerifyWriter::spawn(dev, 32, Some(rate_iops), &h.dir.path().join("fio.json"));
    let shown = |h: &Harness| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
        rows(h, &ALICE)
            .into_iter()
            .map(|r| (r["minor"].clone(), r["pid"].clone(), r["image"].clone()))
            .collect()
    };
    let worker = worker_pid(h);
    for round in 1..=3usize {
        let before = shown(h);
        wait_for_write_progress(h, worker, &mut writer, &format!("broker kill {round}"));
        h.crash();
        assert!(
            alive(worker),
            "round {round}: the worker outlives the broker"
        );
        while_no_broker();
        h.launch();
        assert_eq!(shown(h), before, "round {round}: list changed");
    }
    writer.finish(&h.broker_log());
    let adopted = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "adopt" && l["rule"] == "adopt-minor")
        .count();
    assert_eq!(adopted, 3, "each adoption is audited");
    assert_eq!(rows(h, &ALICE)[0]["restarts"], 0, "never respawned");
}
