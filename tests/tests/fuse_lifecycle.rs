//! FUSE + loop end to end: a real tap-broker with `frontend = "fuse"`, real
//! confined tapdisk workers, tap-ctl, and real block devices — mkfs, mount,
//! kill workers mid-I/O, tear everything down. Needs root, /dev/fuse and
//! loop devices.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::{fio_verify_writer, fuse_loop_turn, holds_open_direct, pattern};

const MIB: u64 = 1 << 20;

/// FUSE tests take turns with every other FUSE + loop test on this host
/// (see [`fuse_loop_turn`]).
fn serial() -> std::fs::File {
    fuse_loop_turn().expect("the FUSE + loop test lock")
}

fn fuse_harness(respawn: bool) -> Harness {
    Harness::start(Options {
        frontend: "fuse",
        respawn,
        tenants: vec![ROOT],
        ..Options::default()
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tap-ctl create`: returns the published device path.
fn create(h: &Harness, spec: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["create", "-a", spec];
    args.extend_from_slice(extra);
    PathBuf::from(h.ok(&ROOT, &args).trim())
}

/// The loop device behind a published `tapdevN` link.
fn loop_node(link: &Path) -> PathBuf {
    let node = fs::read_link(link).expect("tapdev is a symlink");
    assert!(
        node.to_string_lossy().starts_with("/dev/loop"),
        "{} -> {}",
        link.display(),
        node.display()
    );
    node
}

/// Whether `/dev/loopN` is bound to a FUSE disk file (ours).
fn bound_to_fuse(node: &Path) -> bool {
    let name = node.file_name().unwrap().to_string_lossy().to_string();
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|b| b.trim() == "/disk")
}

/// `list --json` as values.
fn list(h: &Harness) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).expect("list --json")
}

fn mount(dev: &Path, at: &Path) {
    fs::create_dir_all(at).unwrap();
    run(Command::new("mount").arg(dev).arg(at));
}

fn umount(at: &Path) {
    run(Command::new("umount").arg(at));
}

fn vhd_check(vhd: &Path) {
    let out = Command::new(bin("tap-ctl"))
        .args(["vhd", "check", "-n"])
        .arg(vhd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tap-ctl vhd check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn fuse_mkfs_write_50mb_destroy_recreate_file_is_identical_and_image_clean() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "disk.vhd", 256);
    let spec = format!("vhd:{}", vhd.display());
    let dev = create(&h, &spec, &[]);
    assert_eq!(dev, h.devices.join("tapdev0"));
    let node = loop_node(&dev);
    assert!(bound_to_fuse(&node));
    let l = list(&h);
    assert_eq!(l[0]["frontend"], "fuse", "{l:?}");
    assert_eq!(l[0]["device"], dev.to_string_lossy().as_ref());

    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = h.dir.path().join("mnt");
    mount(&dev, &mnt);
    let data = pattern((50 * MIB) as usize, 50);
    fs::write(mnt.join("f"), &data).unwrap();
    umount(&mnt);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert!(!dev.exists(), "tapdev link left behind");
    assert!(!bound_to_fuse(&node), "loop device left bound");

    // Again, from scratch: the file is there, byte for byte.
    let dev = create(&h, &spec, &[]);
    mount(&dev, &mnt);
    let back = fs::read(mnt.join("f")).unwrap();
    umount(&mnt);
    assert!(back == data, "file differs after destroy + create");
    h.ok(&ROOT, &["destroy", "-m", "0"]);

    vhd_check(&vhd);
    let raw = h.dir.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&vhd)
        .arg(&raw));
    run(Command::new("e2fsck").arg("-fn").arg(&raw));
    // Thin: 256 MiB virtual, about 50 MiB of data and ext4 metadata.
    let used = fs::metadata(&vhd).unwrap().blocks() * 512;
    assert!(used < 128 * MIB, "image not thin: {used} bytes allocated");
}

#[test]
fn fuse_read_only_open_refuses_writes_and_leaves_the_image_unchanged() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "ro.vhd", 16);
    // Put data in it first, read-write.
    let dev = create(&h, &format!("vhd:{}", vhd.display()), &[]);
    fs::write(&dev, pattern(MIB as usize, 9)).unwrap();
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    let before = sha(&vhd);

    let dev = create(&h, &format!("vhd:{}", vhd.display()), &["-R"]);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let off = buf.as_ptr().align_offset(4096);
    let err = f
        .write_at(&buf[off..off + 4096], 0)
        .expect_err("a write to a read-only device succeeded");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EROFS)),
        "{err}"
    );
    drop(f);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    f.read_exact_at(&mut buf[off..off + 4096], 0).unwrap();
    assert_eq!(&buf[off..off + 4096], &pattern(MIB as usize, 9)[..4096]);
    drop(f);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert_eq!(sha(&vhd), before, "read-only image changed");
}

#[test]
fn fuse_differencing_chain_leaves_its_parent_byte_identical() {
    let _turn = serial();
    let h = fuse_harness(false);
    let parent = h.vhd_image(ROOT.name, "base.vhd", 32);
    let dev = create(&h, &format!("vhd:{}", parent.display()), &[]);
    let base = pattern((4 * MIB) as usize, 1);
    fs::write(&dev, &base).unwrap();
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    let parent_sum = sha(&parent);

    let child = h.root(ROOT.name).join("child.vhd");
    h.vhd_snapshot(&child, &parent);
    let dev = create(&h, &format!("vhd:{}", child.display()), &[]);
    let l = list(&h);
    assert_eq!(l[0]["frontend"], "fuse");
    // Overwrite the second MiB through the child; the rest comes from the
    // parent.
    let f = OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(&pattern(MIB as usize, 2), MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut got = vec![0u8; (4 * MIB) as usize];
    OpenOptions::new()
        .read(true)
        .open(&dev)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    let mut want = base.clone();
    want[MIB as usize..2 * MIB as usize].copy_from_slice(&pattern(MIB as usize, 2));
    assert!(got == want, "chain reads wrong data");
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert_eq!(sha(&parent), parent_sum, "the parent changed");
    vhd_check(&child);
}

#[test]
fn fuse_hundred_create_destroy_cycles_leak_nothing() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "cycle.vhd", 8);
    let spec = format!("vhd:{}", vhd.display());
    let broker = h.broker_pid();
    let mounts_before = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    // Warm up once so lazily opened broker fds (audit log, ...) exist.
    create(&h, &spec, &[]);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    let fds_before = fd_count(broker);
    for i in 0..100u64 {
        let dev = create(&h, &spec, &[]);
        let node = loop_node(&dev);
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap();
        let mut buf = vec![0u8; 8192];
        let off = buf.as_ptr().align_offset(4096);
        buf[off..off + 4096].fill(i as u8);
        f.write_all_at(&buf[off..off + 4096], i * 4096).unwrap();
        drop(f);
        h.ok(&ROOT, &["destroy", "-m", "0"]);
        assert!(
            eventually(Duration::from_secs(5), || !bound_to_fuse(&node)),
            "cycle {i}: {} still bound",
            node.display()
        );
        assert!(!dev.exists(), "cycle {i}: tapdev link left");
    }
    assert!(
        eventually(Duration::from_secs(10), || workers_of(broker).is_empty()),
        "workers left: {:?}",
        workers_of(broker)
    );
    let fds = fd_count(broker);
    assert!(fds <= fds_before, "broker fds: {fds_before} -> {fds}");
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert!(
        mounts <= mounts_before,
        "mounts: {mounts_before} -> {mounts}"
    );
    assert!(list(&h).is_empty());
    // Every cycle's write is in the image.
    let raw = h.dir.path().join("cycle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&vhd)
        .arg(&raw));
    let data = fs::read(&raw).unwrap();
    for i in 0..100usize {
        assert!(
            data[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            "cycle {i}'s write is missing"
        );
    }
}

/// The worker pid of minor 0, from `list`.
fn worker_pid(h: &Harness) -> u32 {
    list(h)[0]["pid"].as_u64().expect("a worker") as u32
}

/// Write requests the worker of minor 0 has completed (from `stats`).
fn writes(h: &Harness) -> u64 {
    let pid = worker_pid(h).to_string();
    let s: serde_json::Value =
        serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", "0", "-p", &pid])).expect("stats JSON");
    s["images"][0]["hits"][1].as_u64().expect("write hits")
}

#[test]
fn fuse_worker_sigkilled_three_times_under_a_direct_io_writer_loses_nothing() {
    let _turn = serial();
    let h = fuse_harness(true);
    let vhd = h.vhd_image(ROOT.name, "kill.vhd", 512);
    let dev = create(&h, &format!("vhd:{}", vhd.display()), &[]);
    // Direct on both sides: the worker's image fd as the kernel holds it
    // (the temp dir is a disk filesystem), and the loop device over FUSE.
    assert_eq!(
        holds_open_direct(worker_pid(&h), &vhd),
        Some(true),
        "the worker's image fd is O_DIRECT"
    );
    let node = loop_node(&dev);
    let name = node.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(
        fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .unwrap()
            .trim(),
        "1",
        "{} does direct I/O to its FUSE file",
        node.display()
    );
    // 384 MiB at depth 16, checksummed, then read back and verified: any
    // failed, lost or misplaced write fails fio.
    let fio = fio_verify_writer(&dev, "384M").spawn().expect("fio");
    let mut killed = Vec::new();
    for round in 1..=3u64 {
        // Mid-I/O: the current worker has completed writes of this fio
        // run since it started (the event), and fio is still going.
        let w0 = writes(&h);
        assert!(
            eventually(Duration::from_secs(60), || writes(&h) >= w0 + 32),
            "round {round}: no write progress\n{}",
            h.broker_log()
        );
        let pid = worker_pid(&h);
        killed.push(pid);
        // SAFETY: kill(2) on a worker pid the broker reported.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert!(
            eventually(Duration::from_secs(20), || {
                let l = list(&h);
                l[0]["restarts"].as_u64() == Some(round) && l[0]["pid"].as_u64() != Some(pid.into())
            }),
            "no restart {round}: {:?}\n{:?}\n{}",
            list(&h),
            h.audit_lines()
                .into_iter()
                .filter(|l| l["event"] == "worker_respawn")
                .map(|l| l["reason"].clone())
                .collect::<Vec<_>>(),
            h.broker_log()
        );
    }
    // The broker respawns dead workers, so fio must finish; bound the wait
    // so a failure is a message, not a hung test.
    h.fio_finished_ok(fio, "worker kills");
    assert_eq!(list(&h)[0]["restarts"], 3);
    let respawns: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "worker_respawn" && l["rule"] == "respawn")
        .collect();
    assert_eq!(respawns.len(), 3, "{respawns:?}");
    for (line, pid) in respawns.iter().zip(&killed) {
        let reason = line["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("dead tapdisk {pid} replaced")),
            "{reason}"
        );
    }
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    vhd_check(&vhd);
}

#[test]
fn fuse_close_of_a_mounted_device_is_refused_unless_forced() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "busy.vhd", 64);
    let dev = create(&h, &format!("vhd:{}", vhd.display()), &[]);
    let node = loop_node(&dev);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    let mnt = h.dir.path().join("mnt");
    mount(&dev, &mnt);
    let err = h.fails(&ROOT, &["close", "-m", "0"]);
    assert!(err.contains("in use"), "{err}");
    // Still served: the mount works.
    fs::write(mnt.join("still"), b"here").unwrap();
    umount(&mnt);
    h.ok(&ROOT, &["close", "-m", "0"]);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert!(!bound_to_fuse(&node));
}

#[test]
fn fuse_pause_pushes_the_page_cache_into_the_image() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "pause.vhd", 16);
    let dev = create(&h, &format!("vhd:{}", vhd.display()), &[]);
    // Buffered, not synced: the data sits in the device's page cache.
    let data = pattern((2 * MIB) as usize, 4);
    OpenOptions::new()
        .write(true)
        .open(&dev)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    h.ok(&ROOT, &["pause", "-m", "0"]);
    let raw = h.dir.path().join("pause.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&vhd)
        .arg(&raw));
    let snap = fs::read(&raw).unwrap();
    assert!(
        snap[..data.len()] == data[..],
        "paused image lacks the cached writes"
    );
    h.ok(&ROOT, &["unpause", "-m", "0"]);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
}

#[test]
fn fuse_broker_shutdown_takes_every_device_down() {
    let _turn = serial();
    let mut h = fuse_harness(false);
    let a = h.vhd_image(ROOT.name, "a.vhd", 8);
    let b = h.vhd_image(ROOT.name, "b.vhd", 8);
    let nodes: Vec<PathBuf> = [a, b]
        .iter()
        .map(|v| loop_node(&create(&h, &format!("vhd:{}", v.display()), &[])))
        .collect();
    let broker = h.broker_pid();
    let workers = workers_of(broker);
    assert_eq!(workers.len(), 2);
    h.stop();
    for n in &nodes {
        assert!(!bound_to_fuse(n), "{} left bound", n.display());
    }
    for w in workers {
        assert!(!alive(w), "worker {w} survived the broker");
    }
    assert!(fs::read_dir(&h.devices).map_or(true, |d| d.count() == 0));
}

/// With respawn off nobody will serve a dead worker's device again: I/O
/// on it must fail, not hang its caller in the kernel, and the minor must
/// still close cleanly afterwards.
#[test]
fn fuse_dead_worker_without_respawn_fails_io_instead_of_hanging() {
    let _turn = serial();
    let h = fuse_harness(false);
    let vhd = h.vhd_image(ROOT.name, "dead.vhd", 16);
    let dev = create(&h, &format!("vhd:{}", vhd.display()), &[]);
    let pid = worker_pid(&h);
    // SAFETY: kill(2) on a worker pid the broker reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(20), || list(&h)[0]["state"]
            .as_u64()
            .is_some_and(|s| s & 1 != 0)),
        "the killed worker's minor is not DEAD: {:?}",
        list(&h)
    );
    match direct_read_outcome(&dev, Duration::from_secs(30)) {
        None => panic!("a read of a dead, unserved device hangs"),
        Some(ok) => assert!(!ok, "a read of a dead device succeeded"),
    }
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert!(list(&h).is_empty(), "{:?}", list(&h));
}
