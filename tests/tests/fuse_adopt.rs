//! A broker crash, restart or upgrade loses no disk (FUSE + loop on this
//! host; the ublk case is in `e2e/ublk.rs`, run in nestvm): workers keep
//! serving while no broker runs, their fds are kept by the fd holder, and
//! the next broker adopts them. Needs root, /dev/fuse, loop and fio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tapjail_tests::*;

/// Take turns with the other FUSE + loop tests (see fuse_lifecycle.rs).
fn serial() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/tapjail-fuse-loop-tests.lock")
        .expect("lock file");
    // SAFETY: flock on an fd we own; blocks until the lock is ours.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

fn harness(respawn: bool) -> Harness {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (FUSE mounts, loop devices)"
    );
    Harness::start(Options {
        frontend: "fuse",
        respawn,
        tenants: vec![ROOT],
        ..Options::default()
    })
}

fn list(h: &Harness) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).expect("list --json")
}

/// (minor, pid, image) of every row: what must survive a restart.
fn rows(h: &Harness) -> Vec<(u64, u64, String)> {
    list(h)
        .iter()
        .map(|r| {
            (
                r["minor"].as_u64().unwrap_or(u64::MAX),
                r["pid"].as_u64().unwrap_or(0),
                r["image"].to_string(),
            )
        })
        .collect()
}

/// Write requests the worker of minor 0 has completed (from `stats`).
fn writes(h: &Harness) -> u64 {
    let pid = list(h)[0]["pid"].as_u64().expect("a worker");
    let s: serde_json::Value =
        serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", "0", "-p", &pid.to_string()]))
            .expect("stats JSON");
    s["images"][0]["hits"][1].as_u64().expect("write hits")
}

fn create(h: &Harness, image: &Path) -> PathBuf {
    PathBuf::from(
        h.ok(
            &ROOT,
            &["create", "-a", &format!("aio:{}", image.display())],
        )
        .trim(),
    )
}

/// 4 KiB random writes with O_DIRECT, crc32c-checksummed and read back:
/// any failed, lost or misplaced write fails fio. Rate-limited so that it
/// lasts (~15 s) across the restarts.
fn fio(dev: &Path) -> Child {
    Command::new("fio")
        .args([
            "--name=adopt",
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=48M",
            "--rate_iops=800",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ])
        .arg(format!("--filename={}", dev.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (install it: apt-get install fio)")
}

fn finish(h: &Harness, fio: Child) {
    let terse = h.fio_finished_ok(fio, "broker restarts");
    // Terse v3: field 5 is the job's error number.
    let err = terse.split(';').nth(4).unwrap_or("?");
    assert_eq!(err, "0", "fio reported error {err}: {terse}");
}

fn adopt_lines(h: &Harness, rule: &str) -> usize {
    h.audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "adopt" && l["rule"] == rule)
        .count()
}

/// Three restarts (each made by `restart`) under fio: no I/O error, and
/// after each the same minors, pids and images, with I/O flowing through
/// the adopted worker before the next one.
fn three_restarts_under_fio(restart: &mut dyn FnMut(&mut Harness, u32)) {
    let _turn = serial();
    let mut h = harness(true);
    let img = h.raw_image(ROOT.name, "a.img", 64 << 20);
    let dev = create(&h, &img);
    let worker = list(&h)[0]["pid"].as_u64().unwrap() as u32;
    // The fd holder runs with no capability and no way to gain one.
    let holder = children_of(h.broker_pid())
        .into_iter()
        .find(|p| is_fd_holder(*p))
        .expect("an fd holder");
    let status = std::fs::read_to_string(format!("/proc/{holder}/status")).unwrap();
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let fio = fio(&dev);
    for round in 1..=3u32 {
        let before = rows(&h);
        let w0 = writes(&h);
        assert!(
            eventually(Duration::from_secs(30), || writes(&h) >= w0 + 200),
            "round {round}: no write progress\n{}",
            h.broker_log()
        );
        let t0 = std::time::Instant::now();
        let w1 = writes(&h);
        restart(&mut h, round);
        let back = t0.elapsed();
        let w2 = writes(&h);
        eprintln!(
            "round {round}: broker back and serving tap-ctl after {} ms; \
             {} writes completed by the worker meanwhile",
            back.as_millis(),
            w2.saturating_sub(w1)
        );
        assert!(alive(worker), "round {round}: the worker died");
        assert_eq!(rows(&h), before, "round {round}: list changed");
        assert_eq!(adopt_lines(&h, "adopt-minor"), round as usize);
        assert_eq!(adopt_lines(&h, "adopt-worker"), round as usize);
    }
    finish(&h, fio);
    assert_eq!(list(&h)[0]["restarts"], 0, "no worker was replaced");
    assert_eq!(adopt_lines(&h, "adopt-worker-refused"), 0);
    h.stop();
    assert!(!alive(worker), "SIGINT takes the disk down");
    assert!(std::fs::read_dir(&h.devices).unwrap().next().is_none());
    // The holder held nothing more and went away.
    assert!(eventually(Duration::from_secs(5), || !h
        .state
        .join("fdholder.sock")
        .exists()));
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broker_sigkilled_three_times_under_fio_verify_loses_no_io() {
    three_restarts_under_fio(&mut |h, _| {
        h.crash();
        h.launch();
    });
}

#[test]
fn planned_upgrades_to_another_binary_under_fio_verify_lose_no_io() {
    let copy = std::env::temp_dir().join(format!("tap-broker-next-{}", std::process::id()));
    std::fs::copy(bin("tap-broker"), &copy).unwrap();
    three_restarts_under_fio(&mut |h, round| {
        h.stop_for_restart();
        // Alternate: old -> new binary -> old -> new.
        if round % 2 == 1 {
            h.launch_bin(&copy);
        } else {
            h.launch();
        }
    });
    let _ = std::fs::remove_file(&copy);
}

/// Kill the worker of minor 0 while no broker runs, then start a read
/// that must wait for (or fail without) a worker.
fn kill_worker_while_down(h: &mut Harness) -> (u32, PathBuf) {
    let img = h.raw_image(ROOT.name, "b.img", 8 << 20);
    let dev = create(h, &img);
    let worker = list(h)[0]["pid"].as_u64().unwrap() as u32;
    h.crash();
    assert!(alive(worker), "the worker outlives its broker");
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(10), || !alive(worker)));
    (worker, dev)
}

#[test]
fn worker_killed_while_no_broker_runs_is_respawned_when_it_returns() {
    let _turn = serial();
    let mut h = harness(true);
    let (dead, dev) = kill_worker_while_down(&mut h);
    // A read now waits: the holder keeps the FUSE connection, so it is
    // queued, not failed.
    let reader = {
        let dev = dev.clone();
        std::thread::spawn(move || direct_read_outcome(&dev, Duration::from_secs(60)))
    };
    h.launch();
    assert_eq!(reader.join().unwrap(), Some(true), "{}", h.broker_log());
    // The respawn is recorded once the new worker's phase is settled.
    assert!(
        eventually(Duration::from_secs(10), || list(&h)[0]["restarts"] == 1
            && h.audit_lines().iter().any(
                |a| a["event"] == "worker_respawn" && a["rule"] == "respawn"
            )),
        "{:?}",
        list(&h)
    );
    assert_ne!(list(&h)[0]["pid"].as_u64(), Some(u64::from(dead)));
    assert_eq!(adopt_lines(&h, "adopt-worker-refused"), 1);
    assert_eq!(
        direct_read_outcome(&dev, Duration::from_secs(10)),
        Some(true)
    );
}

#[test]
fn worker_killed_while_no_broker_runs_fails_io_cleanly_without_respawn() {
    let _turn = serial();
    let mut h = harness(false);
    let (_dead, dev) = kill_worker_while_down(&mut h);
    h.launch();
    // Never hangs: the device's waiting I/O is failed (abandon).
    assert_eq!(
        direct_read_outcome(&dev, Duration::from_secs(20)),
        Some(false),
        "{}",
        h.broker_log()
    );
    assert_eq!(adopt_lines(&h, "adopt-minor"), 1);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert_eq!(list(&h).len(), 0);
}

/// `tap-broker --down` takes down what a broker left on purpose: it adopts
/// everything, then destroys it all and exits (the fd holder goes too).
#[test]
fn down_takes_every_disk_a_stopped_broker_left_down() {
    let _turn = serial();
    let mut h = harness(true);
    let img = h.raw_image(ROOT.name, "d.img", 8 << 20);
    let dev = create(&h, &img);
    let worker = list(&h)[0]["pid"].as_u64().unwrap() as u32;
    h.stop_for_restart();
    assert!(alive(worker), "SIGTERM leaves the disk served");
    assert_eq!(
        direct_read_outcome(&dev, Duration::from_secs(10)),
        Some(true)
    );
    let out = Command::new(bin("tap-broker"))
        .env_remove("NOTIFY_SOCKET")
        .args(["--config", h.policy.to_str().unwrap(), "--down"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(Duration::from_secs(10), || !alive(worker)));
    assert!(std::fs::read_dir(&h.devices).unwrap().next().is_none());
    assert!(eventually(Duration::from_secs(5), || !h
        .state
        .join("fdholder.sock")
        .exists()));
    h.launch();
    assert!(list(&h).is_empty());
}

/// A worker is trusted no more after a restart than before: one whose
/// answer to `Resync` does not match the record (here a fake that claims
/// to have nothing open) is killed, audited, and its disk follows the
/// respawn rules instead of being served by it.
#[test]
fn an_adopted_worker_that_misreports_its_state_is_killed() {
    let mut h = Harness::start(Options {
        worker: WorkerBin::Fake,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let img = h.raw_image(ROOT.name, "e.img", 1 << 20);
    h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())]);
    let worker = list(&h)[0]["pid"].as_u64().unwrap() as u32;
    h.crash();
    assert!(alive(worker));
    h.launch();
    assert!(
        eventually(Duration::from_secs(10), || !alive(worker)),
        "{}",
        h.broker_log()
    );
    assert_eq!(adopt_lines(&h, "adopt-worker"), 1);
    // The supervisor writes the exit's audit line once it sees the exit.
    let killed = |h: &Harness| {
        h.audit_lines().into_iter().any(|l| {
            l["event"] == "worker_exit"
                && l["rule"] == "worker-killed"
                && l["reason"].as_str().is_some_and(|r| {
                    r.contains("not adopted") && r.contains("the record says aio:")
                })
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || killed(&h)),
        "{:?}",
        h.audit_lines()
    );
}

/// NBD: the listening socket is kept, so a client reaches the same worker
/// on the same socket after the broker was `kill -9`ed and came back.
#[test]
fn nbd_disk_survives_a_broker_crash_on_the_same_socket() {
    let mut h = Harness::start(Options {
        tenants: vec![ROOT],
        ..Options::default()
    });
    let img = h.raw_image(ROOT.name, "n.img", 4 << 20);
    h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())]);
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    let qemu_io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &format!("nbd+unix:///tapdev0?socket={}", sock.display()),
                "-c",
                cmd,
            ])
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("fail"),
            "{cmd}: {text}"
        );
    };
    qemu_io("write -P 0x5a 64k 64k");
    let before = rows(&h);
    h.crash();
    h.launch();
    assert_eq!(rows(&h), before, "{}", h.broker_log());
    qemu_io("read -P 0x5a 64k 64k");
    qemu_io("write -P 0x6b 0 4k");
    h.stop();
    assert_eq!(&std::fs::read(&img).unwrap()[..4096], &[0x6b; 4096][..]);
}
