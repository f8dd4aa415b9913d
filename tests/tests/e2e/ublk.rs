//! The ublk frontend end to end: a real tap-broker with `frontend = "ublk"`,
//! real confined tapdisk workers, tap-ctl, and the kernel's ublk driver.
//!
//! This host's kernel has no `ublk_drv`, so these tests are `#[ignore]`d in
//! ordinary runs; `.ci/nestvm-tests` runs them inside nestvm (a 6.12 kernel
//! with the driver, plus loop and ext4 loaded from `.ci/nestvm-modules`).

use crate::kill_under_load::*;
use crate::*;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tapjail_testsupport::{
    spawn_with_tid, tasks_in_d_state, ublk_char_devices, wait_blocked_in_kernel, Aligned,
};

const NEEDS: &str = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests";

fn ublk_harness(respawn: bool) -> Harness {
    let _ = NEEDS;
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "no /dev/ublk-control: these tests run inside nestvm (.ci/nestvm-tests)"
    );
    Harness::start(Options {
        frontend: "ublk",
        respawn,
        ..Options::default()
    })
}

/// `/dev/tapjail/tapdevN` of the harness (its device dir), checked to lead
/// to a ublk block device.
fn tapdev(h: &Harness, minor: u64) -> PathBuf {
    let link = h.devices.join(format!("tapdev{minor}"));
    let target = std::fs::read_link(&link).expect("tapdev symlink");
    assert!(
        target.to_string_lossy().starts_with("/dev/ublkb"),
        "{} -> {}",
        link.display(),
        target.display()
    );
    link
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_mkfs_mount_write_remount_round_trips_on_tapdev() {
    let h = ublk_harness(false);
    let img = h.vhd_image("alice", "fs.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let row = rows(&h, &ALICE).remove(0);
    assert_eq!(row["frontend"], "ublk", "{row}");
    let dev = tapdev(&h, 0);
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", "0"])).unwrap();
    assert!(
        stats.to_string().contains("\"ublk\""),
        "stats name the frontend: {stats}"
    );

    let mnt = tempfile::tempdir().unwrap();
    let data = ext4_file_survives_a_remount(&dev, mnt.path());
    run(Command::new("umount").arg(mnt.path()));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    vhd_check(&img);

    // And again on a fresh device over the same image: the data was in
    // the VHD, not in some cache of the first device.
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    ext4_file_holds(&tapdev(&h, 0), mnt.path(), &data);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_read_only_disk_refuses_writes() {
    let h = ublk_harness(false);
    let img = raw_a5_image(&h);
    h.ok(
        &ALICE,
        &["create", "-R", "-a", &format!("aio:{}", img.display())],
    );
    let row = rows(&h, &ALICE).remove(0);
    assert_eq!(row["read_only"], true, "{row}");
    let dev = tapdev(&h, 0);
    let target = std::fs::read_link(&dev).unwrap();
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{name}/ro"))
            .unwrap()
            .trim(),
        "1"
    );
    read_only_device_refuses_writes(&dev, &img);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_discard_reaches_the_image() {
    let h = ublk_harness(false);
    let size = 16u64 << 20;
    let img = h.raw_image("alice", "d.img", size);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&vec![0x5au8; size as usize], 0)
        .unwrap();
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let dev = tapdev(&h, 0);
    run(Command::new("blkdiscard")
        .args([
            "-o",
            &(4u64 << 20).to_string(),
            "-l",
            &(8u64 << 20).to_string(),
        ])
        .arg(&dev));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    let f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..16u64 {
        f.read_exact_at(&mut buf, mib << 20).unwrap();
        let want = if (4..12).contains(&mib) { 0 } else { 0x5a };
        assert!(buf.iter().all(|&b| b == want), "MiB {mib}");
    }
    let blocks_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_after + (8 << 20) / 512 <= blocks_before,
        "8 MiB given back to the filesystem: {blocks_before} -> {blocks_after} blocks"
    );
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_verifying_writer_survives_three_worker_sigkills() {
    let h = ublk_harness(true);
    let img = h.vhd_image("alice", "v.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let dev = tapdev(&h, 0);
    worker_sigkilled_three_times_under_a_verifying_writer(&h, &dev, |h| {
        tapdev(h, 0);
    });
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    vhd_check(&img);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_fifty_create_destroy_cycles_leave_no_device_behind() {
    let h = ublk_harness(false);
    let img = h.vhd_image("alice", "c.vhd", 8);
    let before = ublk_char_devices();
    for i in 0..50 {
        h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
        if i % 10 == 0 {
            let dev = tapdev(&h, 0);
            let mut b = vec![0u8; 4096];
            std::fs::File::open(&dev)
                .unwrap()
                .read_exact_at(&mut b, 0)
                .unwrap();
        }
        h.ok(&ALICE, &["destroy", "-m", "0"]);
    }
    assert_eq!(ublk_char_devices(), before, "/sys/class/ublk-char");
    assert!(ublk_char_devices().is_empty(), "{:?}", ublk_char_devices());
    vhd_check(&img);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_broker_crash_with_its_worker_gone_is_adopted_dead_and_destroy_removes_it() {
    let mut h = ublk_harness(false);
    let img = h.raw_image("alice", "k.img", 4 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    assert_eq!(ublk_char_devices().len(), 1);
    // Without the fd holder the worker's control socket closes and it
    // exits; the ublk device needs no kept fd, so it is still adopted.
    let holder = children_of(h.broker_pid())
        .into_iter()
        .find(|p| is_fd_holder(*p))
        .expect("the broker runs an fd holder");
    h.crash();
    sigkill(holder);
    assert_eq!(ublk_char_devices().len(), 1);
    h.launch();
    let adopted = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "adopt" && l["rule"] == "adopt-minor")
        .count();
    assert_eq!(adopted, 1, "{}", h.broker_log());
    // Respawn is off: its I/O fails instead of hanging...
    let dev = tapdev(&h, 0);
    assert_eq!(
        direct_read_outcome(&dev, Duration::from_secs(60)),
        Some(false),
        "{}",
        h.broker_log()
    );
    // ...and destroy removes the device.
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(
        eventually(Duration::from_secs(30), || ublk_char_devices().is_empty()),
        "ublk device removed: {:?}\n{}",
        ublk_char_devices(),
        h.broker_log()
    );
}

/// The broker is `kill -9`ed three times under a verifying writer: the
/// ublk device and its worker keep serving while no broker runs, the next
/// broker adopts them (same minor, pid, image), and fio sees no error.
#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_broker_sigkilled_three_times_under_a_verifying_writer_keeps_the_disk() {
    let mut h = ublk_harness(true);
    let img = h.vhd_image("alice", "a.vhd", 64);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let dev = tapdev(&h, 0);
    let chars = ublk_char_devices();
    broker_sigkilled_three_times_under_a_verifying_writer(&mut h, &dev, 600, || {
        assert_eq!(ublk_char_devices(), chars, "the ublk device stays");
    });
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    vhd_check(&img);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_pause_holds_io_and_unpause_at_a_new_path_completes_it() {
    let h = ublk_harness(false);
    let a = h.vhd_image("alice", "a.vhd", 16);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", a.display())]);
    let dev = tapdev(&h, 0);
    h.ok(&ALICE, &["pause", "-m", "0"]);
    // A snapshot while paused: the new leaf has the old one as parent.
    let b = h.root("alice").join("b.vhd");
    h.vhd_snapshot(&b, &a);
    let dev2 = dev.clone();
    let (writer, tid) = spawn_with_tid(move || {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev2)?;
        let mut buf = vec![0u8; 8192];
        let off = buf.as_ptr().align_offset(4096);
        buf[off..off + 4096].fill(0x3c);
        f.write_all_at(&buf[off..off + 4096], 1 << 20)?;
        f.sync_all()
    });
    // The event: the write is parked in the kernel (D state), held.
    assert!(
        wait_blocked_in_kernel(tid, Duration::from_secs(30)),
        "the write did not block while the disk is paused (finished: {})",
        writer.is_finished()
    );
    assert!(!writer.is_finished(), "I/O waits while the disk is paused");
    h.ok(
        &ALICE,
        &["unpause", "-m", "0", "-a", &format!("vhd:{}", b.display())],
    );
    writer
        .join()
        .unwrap()
        .expect("the held write completes after unpause");
    let mut back = vec![0u8; 4096];
    std::fs::File::open(&dev)
        .unwrap()
        .read_exact_at(&mut back, 1 << 20)
        .unwrap();
    assert!(back.iter().all(|&x| x == 0x3c));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    vhd_check(&b);
    vhd_check(&a);
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn blkdiscard(f: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const BLKDISCARD: libc::c_ulong = 0x1277; // _IO(0x12, 119)
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, which points at a
    // local array; the fd is a block device we opened.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

const HAMMER_BLOCK: u64 = 2 << 20; // the VHDs' block size
const HAMMER_THREADS: u64 = 8;

/// Threads that each own every `HAMMER_THREADS`th VHD block write random
/// 4-64 KiB pieces (allocating a block on its first write, in place after),
/// read random ranges back and check them, and now and then discard a whole
/// block, all at once on one device; then everything is read back.
/// Returns the expected contents of the disk.
fn hammer(dev: &Path, initial: Vec<u8>, ops: u64) -> Vec<u8> {
    let size = initial.len() as u64;
    let blocks = size / HAMMER_BLOCK;
    let model = std::sync::Arc::new(std::sync::Mutex::new(initial));
    let threads: Vec<_> = (0..HAMMER_THREADS)
        .map(|t| {
            let dev = dev.to_path_buf();
            let model = model.clone();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)
                    .unwrap();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((t + 1) * 0x1234_5678_9abc);
                let mut buf = Aligned::new(64 << 10);
                let mine: Vec<u64> = (t..blocks).step_by(HAMMER_THREADS as usize).collect();
                let (mut writes, mut reads, mut discards) = (0u32, 0u32, 0u32);
                for op in 0..ops {
                    let block = mine[(xorshift(&mut rng) % mine.len() as u64) as usize];
                    let len = (1 + xorshift(&mut rng) % 16) * 4096;
                    let off =
                        block * HAMMER_BLOCK + (xorshift(&mut rng) % (HAMMER_BLOCK / 4096)) * 4096;
                    let len = len.min((block + 1) * HAMMER_BLOCK - off);
                    let (o, l) = (off as usize, len as usize);
                    match xorshift(&mut rng) % 20 {
                        0 => {
                            let start = block * HAMMER_BLOCK;
                            blkdiscard(&f, start, HAMMER_BLOCK).unwrap();
                            let s = start as usize;
                            model.lock().unwrap()[s..s + HAMMER_BLOCK as usize].fill(0);
                            discards += 1;
                        }
                        1..=12 => {
                            let data = buf.get(l);
                            let mut x = (t << 48) ^ op ^ 0x5555;
                            for chunk in data.chunks_mut(8) {
                                chunk.copy_from_slice(
                                    &xorshift(&mut x).to_le_bytes()[..chunk.len()],
                                );
                            }
                            f.write_all_at(data, off).unwrap();
                            model.lock().unwrap()[o..o + l].copy_from_slice(data);
                            writes += 1;
                        }
                        _ => {
                            let data = buf.get(l);
                            f.read_exact_at(data, off).unwrap();
                            let m = model.lock().unwrap();
                            assert!(
                                data[..] == m[o..o + l],
                                "thread {t} op {op}: read of {l} at {off} differs"
                            );
                            reads += 1;
                        }
                    }
                }
                (writes, reads, discards)
            })
        })
        .collect();
    let mut totals = (0, 0, 0);
    for t in threads {
        let (w, r, d) = t.join().expect("a hammer thread failed");
        totals = (totals.0 + w, totals.1 + r, totals.2 + d);
    }
    eprintln!(
        "hammer: {} writes, {} verified reads, {} discards",
        totals.0, totals.1, totals.2
    );
    assert!(totals.0 > 0 && totals.1 > 0 && totals.2 > 0, "{totals:?}");
    let model = std::sync::Arc::try_unwrap(model)
        .unwrap()
        .into_inner()
        .unwrap();
    assert!(read_device(dev, size) == model, "the whole disk reads back");
    model
}

/// The last worker that ended served requests both on its queue ring
/// (direct image I/O) and through the engine (allocations, discards), as
/// its exit line in the broker log says.
fn assert_both_paths_served(h: &Harness) {
    assert!(
        eventually(Duration::from_secs(30), || h
            .broker_log()
            .contains("requests served on the ring")),
        "{}",
        h.broker_log()
    );
    let log = h.broker_log();
    let relayed = log_events(&log)
        .into_iter()
        .rfind(|e| line_of(e).contains("requests served on the ring"))
        .unwrap();
    // The worker's own JSON line, relayed as a string: its fields.
    let line: serde_json::Value = serde_json::from_str(line_of(&relayed)).unwrap();
    assert!(
        line["on_ring"].as_u64().is_some_and(|n| n > 0)
            && line["through_engine"].as_u64().is_some_and(|n| n > 0),
        "both paths used: {line}"
    );
}

fn read_device(dev: &Path, size: u64) -> Vec<u8> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut out = Vec::with_capacity(size as usize);
    let mut buf = Aligned::new(1 << 20);
    let mut off = 0;
    while off < size {
        let b = buf.get(1 << 20);
        f.read_exact_at(b, off).unwrap();
        out.extend_from_slice(b);
        off += 1 << 20;
    }
    out
}

/// Where the data is, after the device is gone: a new device on the
/// same image reads `want`.
fn reread_image(h: &Harness, spec: &str, want: &[u8]) {
    h.ok(&ALICE, &["create", "-a", spec]);
    let dev = tapdev(h, 0);
    assert!(
        read_device(&dev, want.len() as u64) == want,
        "the image holds what the device acknowledged"
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_mixed_allocating_and_in_place_writes_verify_on_a_dynamic_vhd() {
    let h = ublk_harness(false);
    let mib = 64;
    let img = h.vhd_image("alice", "m.vhd", mib);
    let spec = format!("vhd:{}", img.display());
    h.ok(&ALICE, &["create", "-a", &spec]);
    let dev = tapdev(&h, 0);
    // Every other block written up front: writes there go in place on the
    // ring, writes elsewhere allocate through the engine.
    let mut initial = vec![0u8; (mib << 20) as usize];
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap();
        let mut buf = Aligned::new(1 << 20);
        for block in (0..mib / 2).step_by(2) {
            for mib_in in 0..2 {
                let off = block * HAMMER_BLOCK + mib_in * (1 << 20);
                let b = buf.get(1 << 20);
                b.fill((block as u8).wrapping_mul(31) | 1);
                f.write_all_at(b, off).unwrap();
                initial[off as usize..off as usize + (1 << 20)].copy_from_slice(b);
            }
        }
    }
    let want = hammer(&dev, initial, 150);
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", "0"])).unwrap();
    eprintln!("stats: {stats}");
    assert_eq!(stats["reqs_outstanding"], 0, "{stats}");
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert_both_paths_served(&h);
    vhd_check(&img);
    reread_image(&h, &spec, &want);
    vhd_check(&img);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_mixed_writes_verify_on_a_differencing_chain() {
    let h = ublk_harness(false);
    let mib = 32;
    let base = h.vhd_image("alice", "base.vhd", mib);
    // The parent gets data in its first half, through a device of its own.
    let mut initial = vec![0u8; (mib << 20) as usize];
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", base.display())],
    );
    {
        let dev = tapdev(&h, 0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap();
        let mut buf = Aligned::new(1 << 20);
        for m in 0..mib / 2 {
            let b = buf.get(1 << 20);
            b.fill((m as u8).wrapping_mul(17) | 3);
            f.write_all_at(b, m << 20).unwrap();
            initial[(m << 20) as usize..((m + 1) << 20) as usize].copy_from_slice(b);
        }
    }
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    let leaf = h.root("alice").join("leaf.vhd");
    h.vhd_snapshot(&leaf, &base);
    let spec = format!("vhd:{}", leaf.display());
    h.ok(&ALICE, &["create", "-a", &spec]);
    let dev = tapdev(&h, 0);
    // Reads come from the leaf, the parent or zeroes; writes allocate leaf
    // blocks, set bitmap bits, or go in place once their sectors are set.
    let want = hammer(&dev, initial, 150);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert_both_paths_served(&h);
    vhd_check(&leaf);
    vhd_check(&base);
    reread_image(&h, &spec, &want);
}

/// With respawn off nobody will end the recovery of a dead worker's
/// device: the broker stops it, so I/O waiting on it fails instead of
/// hanging in the kernel, and the minor still destroys cleanly.
#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_dead_worker_without_respawn_fails_io_instead_of_hanging() {
    let h = ublk_harness(false);
    let img = h.vhd_image("alice", "dead.vhd", 16);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", img.display())]);
    let dev = std::fs::canonicalize(tapdev(&h, 0)).unwrap();
    let pid = rows(&h, &ALICE)[0]["pid"].as_u64().unwrap() as u32;
    sigkill(pid);
    assert!(
        eventually(Duration::from_secs(60), || rows(&h, &ALICE)[0]["state"]
            .as_u64()
            .is_some_and(|s| s & 1 != 0)),
        "the killed worker's minor is not DEAD: {:?}",
        rows(&h, &ALICE)
    );
    match direct_read_outcome(&dev, Duration::from_secs(120)) {
        None => panic!("a read of a dead, unserved ublk device hangs"),
        Some(ok) => assert!(!ok, "a read of a dead device succeeded"),
    }
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(rows(&h, &ALICE).is_empty());
    assert!(ublk_char_devices().is_empty(), "{:?}", ublk_char_devices());
    assert!(tasks_in_d_state().is_empty(), "{:?}", tasks_in_d_state());
}
