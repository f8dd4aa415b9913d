//! I/O limits on the ublk frontend (issue 14): the worker paces a limited
//! ublk disk as it does NBD and FUSE disks, judged by its bucket's own
//! schedule from `tap-ctl stats` (not the wall clock), and a delayed read
//! does not wait behind delayed writes. Needs `ublk_drv`: `#[ignore]`d on
//! this host, run inside nestvm by `.ci/nestvm-tests` (filter `qos_ublk::`).

use crate::*;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapjail_testsupport::Aligned;

fn ublk_disk(h: &Harness) -> (String, PathBuf) {
    let img = h.raw_image("alice", "q.img", 4 << 20);
    let dev = h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let minor = dev.trim().rsplit("tapdev").next().unwrap().to_string();
    let link = h.devices.join(format!("tapdev{minor}"));
    let target = std::fs::read_link(&link).expect("tapdev symlink");
    assert!(
        target.to_string_lossy().starts_with("/dev/ublkb"),
        "{} -> {}",
        link.display(),
        target.display()
    );
    (minor, link)
}

fn stats(h: &Harness, minor: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", minor])).unwrap()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `n` threads each writing 4 KiB (O_DIRECT) at 8 KiB slot `first + i`
/// (gaps between them, so the block layer merges none).
fn writers(dev: &Path, first: u64, n: u64) -> Vec<std::thread::JoinHandle<std::io::Result<()>>> {
    (first..first + n)
        .map(|slot| {
            let dev = dev.to_path_buf();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&dev)?;
                let mut buf = Aligned::new(4096);
                buf.buf().fill(slot as u8);
                f.write_all_at(buf.buf(), slot * 8192)
            })
        })
        .collect()
}

fn read_direct(dev: &Path, slot: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut buf = Aligned::new(4096);
    f.read_exact_at(buf.buf(), slot * 8192)?;
    Ok(buf.buf().to_vec())
}

fn ublk_harness() -> Harness {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "no /dev/ublk-control: these tests run inside nestvm (.ci/nestvm-tests)"
    );
    Harness::start(Options {
        frontend: "ublk",
        ..Options::default()
    })
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn qos_ublk_limited_disk_paces_writes_at_its_rate() {
    const N: u64 = 40;
    let h = ublk_harness();
    let (m, dev) = ublk_disk(&h);
    h.ok(&ROOT, &["throttle", "-m", &m, "--write-iops", "20:5"]);
    for w in writers(&dev, 0, N) {
        if let Err(e) = w.join().unwrap() {
            panic!(
                "a delayed write failed: {e}\nstats: {}\n{}",
                stats(&h, &m),
                h.broker_log()
            );
        }
    }
    let th = stats(&h, &m)["throttle"].clone();
    assert_eq!(th["disk"]["write_iops"]["per_sec"], 20, "{th}");
    assert_eq!(u(&th["paced"][0]), 0, "reads are not limited: {th}");
    assert!(u(&th["paced"][1]) >= N, "{th}");
    assert!(u(&th["delayed"][1]) >= 1, "{th}");
    let span = u(&th["last_release_us"][1]) - u(&th["first_release_us"][1]);
    assert!(
        span >= (N - 5) * 1_000_000 / 20,
        "{span} us for {N} writes: {th}"
    );
    // What they wrote is there.
    for slot in [0, N / 2, N - 1] {
        assert!(read_direct(&dev, slot)
            .unwrap()
            .iter()
            .all(|b| *b == slot as u8));
    }
}

/// A read the limits delay goes to its own lane, not behind the delayed
/// writes (which once held every slow-path thread of the queue, the
/// delayed read queued behind them).
#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn qos_ublk_delayed_read_does_not_wait_behind_delayed_writes() {
    const W: u64 = 48; // far more than the slow-path threads (4 a queue)
    let h = ublk_harness();
    let (m, dev) = ublk_disk(&h);
    h.ok(
        &ROOT,
        &[
            "throttle",
            "-m",
            &m,
            "--write-iops",
            "1:1",
            "--read-iops",
            "10:1",
        ],
    );
    let ws = writers(&dev, 0, W);
    assert!(
        eventually(Duration::from_secs(60), || u(
            &stats(&h, &m)["throttle"]["paced"][1]
        ) >= W),
        "the writes did not all reach the throttle: {}",
        stats(&h, &m)
    );
    // Two reads at once: the second is delayed (a tenth of a second).
    let readers: Vec<_> = [200u64, 201]
        .into_iter()
        .map(|slot| {
            let dev = dev.clone();
            std::thread::spawn(move || read_direct(&dev, slot))
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap().unwrap().iter().all(|b| *b == 0));
    }
    let s = stats(&h, &m);
    assert!(
        u(&s["throttle"]["delayed"][0]) >= 1,
        "a read was delayed: {s}"
    );
    let written = u(&s["secs"][1]) / 8;
    assert!(
        written < W / 2,
        "the delayed read waited for {written} of {W} delayed writes: {s}"
    );
    // Teardown: destroying the disk fails the delayed writes at once.
    h.ok(&ALICE, &["destroy", "-m", &m]);
    for w in ws {
        let _ = w.join().unwrap();
    }
}
