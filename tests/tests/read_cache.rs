//! `open -r` (XAPI's IntelliCache) end to end: a real tap-broker with
//! `frontend = "fuse"`, a real confined tapdisk and a loop device. The
//! read cache is a differencing VHD over a gold image, in the tenant's
//! `read_cache_root`, as SM makes it (`PARENT.vhdcache`). Needs root,
//! /dev/fuse and loop devices.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, is_root, require};
use tapjail_testsupport::{pattern, Aligned};

const MIB: usize = 1 << 20;
const SIZE_MIB: u64 = 16;
/// Sectors of the whole disk.
const DISK_SECTORS: u64 = SIZE_MIB * 2048;

fn harness() -> Harness {
    Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE, BOB],
        tenant_lines: vec![("alice", "read_cache_root = \"{root}/cache\"".into())],
        ..Options::default()
    })
}

/// `tap-ctl vhd write` (the offline tool, as root) of `data` at `offset`.
fn vhd_write(img: &Path, offset: usize, data: &[u8]) {
    use std::io::Write;
    let mut c = Command::new(bin("tap-ctl"))
        .args(["vhd", "write", "-n"])
        .arg(img)
        .args(["-o", &offset.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tap-ctl vhd write");
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Alice's gold image (its first half a pattern) and its read cache in
/// her cache root, as SM prepares them.
fn gold_and_cache(h: &Harness, seed: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let gold = h.vhd_image(ALICE.name, "gold.vhd", SIZE_MIB);
    let data = pattern(SIZE_MIB as usize * MIB / 2, seed);
    vhd_write(&gold, 0, &data);
    let dir = h.root(ALICE.name).join("cache");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    let cache = dir.join("gold.vhdcache");
    h.vhd_snapshot(&cache, &gold);
    let mut want = data;
    want.resize(SIZE_MIB as usize * MIB, 0);
    (gold, cache, want)
}

struct Disk {
    pid: String,
    dev: PathBuf,
}

/// SM's sequence: allocate, spawn, attach, then `open -r`.
fn attach(h: &Harness) -> Disk {
    let dev = PathBuf::from(h.ok(&ALICE, &["allocate"]).trim());
    let pid = h.ok(&ALICE, &["spawn"]).trim().to_string();
    h.ok(&ALICE, &["attach", "-p", &pid, "-m", "0"]);
    Disk { pid, dev }
}

fn open_r(h: &Harness, d: &Disk, img: &Path) {
    let a = format!("vhd:{}", img.display());
    h.ok(&ALICE, &["open", "-p", &d.pid, "-m", "0", "-a", &a, "-r"]);
}

fn stats(h: &Harness) -> serde_json::Value {
    let l: Vec<serde_json::Value> =
        serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).expect("list --json");
    let pid = l[0]["pid"].as_u64().expect("pid").to_string();
    serde_json::from_str(&h.ok(&ALICE, &["stats", "-p", &pid, "-m", "0"])).expect("stats JSON")
}

fn counter(s: &serde_json::Value, key: &str) -> u64 {
    s["read_cache"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("read_cache.{key} in {s}"))
}

/// The whole device, read with O_DIRECT (so every read reaches the worker).
fn read_all(dev: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut buf = Aligned::new(MIB);
    let mut out = Vec::new();
    loop {
        let n = f.read(buf.buf())?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf.buf()[..n]);
    }
}

fn preconditions() -> bool {
    require(is_root(), "root (loop devices, FUSE mounts, tenant uids)")
        && require(Path::new("/dev/fuse").exists(), "/dev/fuse")
}

#[test]
fn read_cache_open_r_fills_on_miss_hits_after_and_a_changed_parent_empties_it() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !preconditions() {
        return;
    }
    let h = harness();
    let (gold, cache, want) = gold_and_cache(&h, 11);

    // Policy first: only beneath the tenant's read_cache_root, only for a
    // tenant that has one.
    let d = attach(&h);
    let a = format!("vhd:{}", gold.display());
    let e = h.fails(&ALICE, &["open", "-p", &d.pid, "-m", "0", "-a", &a, "-r"]);
    assert!(e.contains("read_cache_root"), "{e}");
    let bob_img = h.vhd_image(BOB.name, "b.vhd", 8);
    let bob_pid = h.ok(&BOB, &["spawn"]).trim().to_string();
    let bob_dev = h.ok(&BOB, &["allocate"]);
    let bob_minor = bob_dev.trim().rsplit("tapdev").next().unwrap().to_string();
    h.ok(&BOB, &["attach", "-p", &bob_pid, "-m", &bob_minor]);
    let e = h.fails(
        &BOB,
        &[
            "open",
            "-p",
            &bob_pid,
            "-m",
            &bob_minor,
            "-a",
            &format!("vhd:{}", bob_img.display()),
            "-r",
        ],
    );
    assert!(e.contains("no read_cache_root"), "{e}");
    let rules: Vec<String> = h
        .audit_lines()
        .iter()
        .filter_map(|l| l["rule"].as_str().map(String::from))
        .collect();
    assert!(rules.iter().any(|r| r == "read-cache-root"), "{rules:?}");
    assert!(rules.iter().any(|r| r == "read-cache"), "{rules:?}");

    open_r(&h, &d, &cache);
    let s0 = stats(&h);
    assert_eq!(
        s0["images"][0]["name"].as_str(),
        Some(cache.to_str().unwrap()),
        "the cache file in the policy's cache root is the leaf: {s0}"
    );
    let len0 = fs::metadata(&cache).unwrap().len();
    let got = read_all(&d.dev).expect("first read");
    assert!(got == want, "first read: the chain's data");
    let s1 = stats(&h);
    assert!(
        counter(&s1, "misses") >= counter(&s0, "misses") + DISK_SECTORS,
        "every sector missed once: {s1}"
    );
    assert!(
        counter(&s1, "filled") >= counter(&s0, "filled") + DISK_SECTORS,
        "every miss filled: {s1}"
    );
    assert!(
        fs::metadata(&cache).unwrap().len() >= len0 + SIZE_MIB * MIB as u64,
        "the cache file holds the disk now"
    );
    let got = read_all(&d.dev).expect("second read");
    assert!(got == want, "second read: the same data, from the cache");
    let s2 = stats(&h);
    assert_eq!(
        counter(&s2, "misses"),
        counter(&s1, "misses"),
        "no miss the second time: {s2}"
    );
    assert!(
        counter(&s2, "hits") >= counter(&s1, "hits") + DISK_SECTORS,
        "every sector hit: {s2}"
    );
    assert!(s2["read_cache"]["reset"].is_null(), "{s2}");
    // The guest cannot write a read cache.
    let before = fs::read(&cache).unwrap();
    let w = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&d.dev)
        .unwrap();
    let mut buf = Aligned::new(4096);
    buf.buf().fill(0x5a);
    let err = std::os::unix::fs::FileExt::write_at(&w, buf.buf(), 0)
        .expect_err("a write to a read cache's device succeeded");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EROFS)),
        "{err}"
    );
    drop(w);
    assert!(
        fs::read(&cache).unwrap() == before,
        "the cache file is unchanged"
    );
    // Reopened only beneath the cache root: an unpause at another path
    // is refused and the disk stays paused; at its own path it serves.
    h.ok(&ALICE, &["pause", "-p", &d.pid, "-m", "0"]);
    let e = h.fails(&ALICE, &["unpause", "-p", &d.pid, "-m", "0", "-a", &a]);
    assert!(e.contains("read_cache_root"), "{e}");
    let c = format!("vhd:{}", cache.display());
    h.ok(&ALICE, &["unpause", "-p", &d.pid, "-m", "0", "-a", &c]);
    assert!(read_all(&d.dev).expect("read after unpause") == want);
    h.ok(&ALICE, &["close", "-p", &d.pid, "-m", "0"]);
    let audit = h.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l.to_string().contains("-r: served as a read cache")),
        "the open's outcome is audited"
    );

    // The parent changes (written offline; its mtime moves on, set here
    // so the test does not depend on the clock): the cache is emptied and
    // the new data is served, never the cached old.
    let new = pattern(MIB, 12);
    vhd_write(&gold, 0, &new);
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&gold)
        .unwrap()
        .set_modified(later)
        .unwrap();
    open_r(&h, &d, &cache);
    let s3 = stats(&h);
    let why = s3["read_cache"]["reset"].as_str().unwrap_or_default();
    assert!(why.contains("changed"), "the cache was emptied: {s3}");
    let mut want2 = want.clone();
    want2[..MIB].copy_from_slice(&new);
    let got = read_all(&d.dev).expect("read after the parent changed");
    assert!(got == want2, "the changed parent's data");
    let got = read_all(&d.dev).expect("read again");
    assert!(got == want2);
    let s4 = stats(&h);
    assert!(
        counter(&s4, "hits") >= DISK_SECTORS,
        "cached again under the new tie: {s4}"
    );
    h.ok(&ALICE, &["close", "-p", &d.pid, "-m", "0"]);
    h.ok(&ALICE, &["detach", "-p", &d.pid, "-m", "0"]);
    h.ok(&ALICE, &["free", "-m", "0"]);
}

#[test]
fn read_cache_worker_sigkilled_mid_fill_still_serves_the_chains_data() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !preconditions() {
        return;
    }
    // Reads limited to 4 MiB/s so that the kill lands while the first
    // pass still fills (16 MiB take about 4 s).
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE],
        tenant_lines: vec![(
            "alice",
            "read_cache_root = \"{root}/cache\"\ndisk_io = { read_bps = 4194304 }".into(),
        )],
        ..Options::default()
    });
    let (_, cache, want) = gold_and_cache(&h, 21);
    let d = attach(&h);
    open_r(&h, &d, &cache);
    let dev = d.dev.clone();
    let reader = std::thread::spawn(move || read_all(&dev));
    assert!(
        eventually(Duration::from_secs(60), || counter(&stats(&h), "filled")
            > 0),
        "no fill started\n{}",
        h.broker_log()
    );
    let l: Vec<serde_json::Value> =
        serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).unwrap();
    let pid = l[0]["pid"].as_u64().unwrap() as i32;
    let filled = counter(&stats(&h), "filled");
    assert!(
        filled < DISK_SECTORS,
        "killed mid-fill ({filled} sectors filled)"
    );
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(30), || {
            let l: Vec<serde_json::Value> =
                serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).unwrap();
            l[0]["restarts"].as_u64() == Some(1) && l[0]["pid"].as_u64() != Some(pid as u64)
        }),
        "no respawn\n{}",
        h.broker_log()
    );
    // The interrupted read either completed with the right data (FUSE
    // replayed its requests to the new worker) or failed; never wrong.
    if let Ok(got) = reader.join().unwrap() {
        assert!(got == want, "the read across the kill");
    }
    let got = read_all(&d.dev).expect("read after respawn");
    assert!(got == want, "after the kill: the chain's data");
    let s = stats(&h);
    assert!(
        s["read_cache"].is_object(),
        "the respawned worker serves a read cache again: {s}"
    );
    let got = read_all(&d.dev).expect("read again");
    assert!(got == want);
    let s2 = stats(&h);
    assert_eq!(
        counter(&s2, "misses"),
        counter(&s, "misses"),
        "all cached now: {s2}"
    );
    let l: Vec<serde_json::Value> =
        serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).unwrap();
    let pid = l[0]["pid"].as_u64().unwrap().to_string();
    h.ok(&ALICE, &["close", "-p", &pid, "-m", "0"]);
}
