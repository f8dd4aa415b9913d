//! The kernel nbd frontend end to end: a real tap-broker with
//! `frontend = "nbd-kernel"`, real confined tapdisk workers, tap-ctl, and
//! the kernel's nbd client on `/dev/nbdN`, connected over netlink.
//!
//! This host has no `nbd.ko`: the one host test checks the refusal; the
//! others are `#[ignore]`d here and run inside nestvm (`.ci/nestvm-tests`,
//! a 6.12 kernel with nbd, loop and ext4).

use crate::kill_under_load::*;
use crate::*;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn nbd_harness(respawn: bool) -> Harness {
    nbd_harness_with(respawn, "")
}

fn nbd_harness_with(respawn: bool, extra: &str) -> Harness {
    assert!(
        Path::new("/sys/module/nbd").exists(),
        "no nbd module: these tests run inside nestvm (.ci/nestvm-tests)"
    );
    Harness::start(Options {
        frontend: "nbd-kernel",
        respawn,
        extra: extra.to_string(),
        ..Options::default()
    })
}

/// `/dev/tapjail/tapdevN` of the harness, checked to lead to `/dev/nbdK`;
/// returns the link and K.
fn tapdev(h: &Harness, minor: u64) -> (PathBuf, u32) {
    let link = h.devices.join(format!("tapdev{minor}"));
    let target = std::fs::read_link(&link).expect("tapdev symlink");
    let index = target
        .to_str()
        .and_then(|t| t.strip_prefix("/dev/nbd"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{} -> {}", link.display(), target.display()));
    (link, index)
}

/// nbd devices the kernel holds a connection for (`/sys/block/nbdN/pid`).
fn connected_nbds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (name.starts_with("nbd") && Path::new(&format!("/sys/block/{name}/pid")).exists())
                .then_some(name)
        })
        .collect();
    v.sort();
    v
}

/// On a host without nbd.ko, a broker told to use it refuses to start and
/// says which driver is missing and how to load it (and `auto` skips it:
/// `device::factory::tests::factory_nbd_kernel_without_the_driver_…`).
#[test]
fn nbd_kernel_broker_without_nbd_ko_refuses_to_start_naming_the_driver() {
    if !tapjail_testsupport::require(
        !Path::new("/sys/module/nbd").exists(),
        "a host without the nbd module (this test checks the refusal there)",
    ) {
        return;
    }
    let mut h = Harness::start(Options::default());
    h.stop();
    let text = std::fs::read_to_string(&h.policy).unwrap();
    assert!(text.contains("frontend = \"nbd\""), "{text}");
    let policy = h.dir.path().join("nbd-kernel.toml");
    std::fs::write(
        &policy,
        text.replace("frontend = \"nbd\"", "frontend = \"nbd-kernel\""),
    )
    .unwrap();
    let out = Command::new(bin("tap-broker"))
        .arg("--config")
        .arg(&policy)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without nbd.ko: {err}");
    assert!(err.contains("nbd-kernel:"), "{err}");
    assert!(err.contains("kernel nbd driver not loaded"), "{err}");
    assert!(err.contains("modprobe nbd"), "{err}");
    assert!(
        std::fs::read_dir(&h.devices).map_or(true, |mut d| d.next().is_none()),
        "no device published"
    );
}

#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_mkfs_mount_write_remount_round_trips_on_tapdev() {
    let h = nbd_harness(false);
    let img = h.vhd_image("alice", "fs.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let row = rows(&h, &ALICE).remove(0);
    assert_eq!(row["frontend"], "nbd-kernel", "{row}");
    let (dev, index) = tapdev(&h, 0);
    assert!(
        row["device"]
            .as_str()
            .is_some_and(|d| d.ends_with("/tapdev0")),
        "list shows the device: {row}"
    );
    let backend = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).unwrap();
    assert!(backend.trim().ends_with(":tapdev0"), "{backend}");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/nbd{index}/queue/max_sectors_kb"))
            .unwrap()
            .trim(),
        "512",
        "requests capped at what the worker accepts"
    );
    // 64 MiB, as the image.
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
            .unwrap()
            .trim(),
        ((64u64 << 20) / 512).to_string()
    );

    let mnt = tempfile::tempdir().unwrap();
    let data = ext4_file_survives_a_remount(&dev, mnt.path());
    // A mounted device is not closed without -f.
    let refused = h.fails(&ALICE, &["close", "-m", "0"]);
    assert!(!refused.is_empty());
    run(Command::new("umount").arg(mnt.path()));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(
        !Path::new(&format!("/sys/block/nbd{index}/pid")).exists(),
        "nbd{index} still connected after destroy"
    );
    vhd_check(&img);

    // Again on a fresh connection over the same image: the data was in
    // the VHD, not in a cache of the first device.
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    ext4_file_holds(&tapdev(&h, 0).0, mnt.path(), &data);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
}

#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_read_only_disk_refuses_writes() {
    let h = nbd_harness(false);
    let img = raw_a5_image(&h);
    h.ok(
        &ALICE,
        &["create", "-R", "-a", &format!("aio:{}", img.display())],
    );
    let (dev, index) = tapdev(&h, 0);
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/nbd{index}/ro"))
            .unwrap()
            .trim(),
        "1"
    );
    read_only_device_refuses_writes(&dev, &img);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
}

#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_verifying_writer_survives_three_worker_sigkills() {
    let h = nbd_harness(true);
    let img = h.vhd_image("alice", "v.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let (dev, index) = tapdev(&h, 0);
    worker_sigkilled_three_times_under_a_verifying_writer(&h, &dev, |h| {
        // The same device, moved to the new worker.
        assert_eq!(tapdev(h, 0).1, index);
    });
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
    vhd_check(&img);
}

/// With `nbd_kernel_connections = 4` the worker serves four connections,
/// and a respawned worker gets four fresh ones through
/// NBD_CMD_RECONFIGURE: three SIGKILLs under a verifying writer, no error.
/// A broker that adopts the device after a crash still replaces all four
/// (the count is in its record, even after the policy changed to 1).
#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_four_connections_survive_three_worker_sigkills_and_an_adoption() {
    let mut h = nbd_harness_with(true, "nbd_kernel_connections = 4\n");
    let img = h.vhd_image("alice", "v.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let (dev, index) = tapdev(&h, 0);
    // The worker says how many it serves (its log, relayed by the broker).
    let four_served = |h: &Harness| {
        let pid = rows(h, &ALICE)[0]["pid"].as_u64().unwrap();
        eventually(std::time::Duration::from_secs(30), || {
            worker_events(&h.broker_log(), pid)
                .iter()
                .any(|e| line_of(e).contains("kernel nbd client on 4 connection(s)"))
        })
    };
    assert!(four_served(&h), "{}", h.broker_log());
    worker_sigkilled_three_times_under_a_verifying_writer(&h, &dev, |h| {
        assert_eq!(tapdev(h, 0).1, index, "the same device");
        assert!(four_served(h), "the new worker got four connections");
    });

    // Adopted by a broker whose policy now says 1: a respawn still
    // replaces the four connections the device has.
    h.crash();
    let policy = std::fs::read_to_string(&h.policy).unwrap();
    std::fs::write(
        &h.policy,
        policy.replace("nbd_kernel_connections = 4", "nbd_kernel_connections = 1"),
    )
    .unwrap();
    h.launch();
    let before = rows(&h, &ALICE)[0]["pid"].as_u64().unwrap() as u32;
    sigkill(before);
    assert!(
        eventually(std::time::Duration::from_secs(120), || {
            let r = rows(&h, &ALICE);
            r[0]["restarts"] == 4 && r[0]["state"] == 0
        }),
        "{:?}\n{}",
        rows(&h, &ALICE),
        h.broker_log()
    );
    assert!(four_served(&h), "after adoption: {}", h.broker_log());
    // And it serves: a write and its read-back through the device.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let mut block = tapjail_testsupport::Aligned::new(4096);
    block.buf().fill(0x5a);
    f.write_all_at(block.buf(), 1 << 20).unwrap();
    f.sync_all().unwrap();
    let mut back = tapjail_testsupport::Aligned::new(4096);
    f.read_exact_at(back.buf(), 1 << 20).unwrap();
    assert!(back.buf().iter().all(|&b| b == 0x5a));
    drop(f);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
    vhd_check(&img);
}

/// The broker is `kill -9`ed three times under a verifying writer: the
/// nbd device stays connected to its worker while no broker runs (the
/// kernel holds the socket), the next broker adopts it by the backend
/// identifier it set (same minor, pid, image, nbd index), and fio sees no
/// error.
#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_broker_sigkilled_three_times_under_a_verifying_writer_keeps_the_disk() {
    let mut h = nbd_harness(true);
    let img = h.vhd_image("alice", "a.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let (dev, index) = tapdev(&h, 0);
    broker_sigkilled_three_times_under_a_verifying_writer(&mut h, &dev, 400, || {
        // The kernel holds the socket: the device stays connected.
        assert_eq!(connected_nbds(), vec![format!("nbd{index}")]);
    });
    assert_eq!(tapdev(&h, 0).1, index, "the same nbd device");
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
    vhd_check(&img);
}

#[test]
#[ignore = "needs nbd.ko: run inside nestvm via .ci/nestvm-tests"]
fn nbd_kernel_fifty_create_destroy_cycles_leave_no_device_connected() {
    let h = nbd_harness(false);
    let img = h.vhd_image("alice", "c.vhd", 8);
    assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
    for i in 0..50 {
        h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
        if i % 10 == 0 {
            let (dev, _) = tapdev(&h, 0);
            let mut b = vec![0u8; 4096];
            std::fs::File::open(&dev)
                .unwrap()
                .read_exact_at(&mut b, 0)
                .unwrap();
        }
        h.ok(&ALICE, &["destroy", "-m", "0"]);
        assert!(
            connected_nbds().is_empty(),
            "cycle {i}: {:?}",
            connected_nbds()
        );
    }
    vhd_check(&img);
}
