//! `open -e A` on a read cache minor A (`open -r`), SM's IntelliCache leaf
//! step, end to end: a real tap-broker with `frontend = "fuse"`, real
//! confined tapdisks and loop devices. A serves `gold.vhdcache` (a child
//! of gold in the tenant's `read_cache_root`); the VM's leaf is a child of
//! that cache (as SM's `vhd-util snapshot LEAF.vhdcache PARENT.vhdcache`),
//! opened as B with `-e A`. Needs root, /dev/fuse and loop devices.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, is_root, require};
use tapjail_testsupport::{pattern, Aligned};

const MIB: usize = 1 << 20;
const SIZE_MIB: u64 = 16;
const DISK_SECTORS: u64 = SIZE_MIB * 2048;

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

/// The whole device, read with O_DIRECT (so every read reaches the worker).
fn read_all(dev: &Path) -> Vec<u8> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(MIB);
    let mut out = Vec::new();
    loop {
        let n = f.read(buf.buf()).expect("read device");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf.buf()[..n]);
    }
}

fn list(h: &Harness) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).expect("list --json")
}

fn entry(h: &Harness, minor: u64) -> serde_json::Value {
    list(h)
        .into_iter()
        .find(|e| e["minor"].as_u64() == Some(minor))
        .unwrap_or_else(|| panic!("minor {minor} in list"))
}

fn stats(h: &Harness, minor: u64) -> serde_json::Value {
    let pid = entry(h, minor)["pid"].as_u64().expect("pid").to_string();
    let m = minor.to_string();
    serde_json::from_str(&h.ok(&ALICE, &["stats", "-p", &pid, "-m", &m])).expect("stats JSON")
}

/// Sectors read from layer `i` of `s` (0 = the leaf).
fn layer_reads(s: &serde_json::Value, i: usize) -> u64 {
    s["images"][i]["hits"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("images[{i}].hits in {s}"))
}

struct Disk {
    pid: String,
    dev: PathBuf,
    minor: String,
}

/// SM's order: allocate, spawn, attach (the open comes after).
fn attach(h: &Harness) -> Disk {
    let dev = h.ok(&ALICE, &["allocate"]).trim().to_string();
    let minor = dev.rsplit("tapdev").next().unwrap().to_string();
    let pid = h.ok(&ALICE, &["spawn"]).trim().to_string();
    h.ok(&ALICE, &["attach", "-p", &pid, "-m", &minor]);
    Disk {
        pid,
        dev: PathBuf::from(dev),
        minor,
    }
}

#[test]
fn read_cache_clone_reads_leaf_then_cache_then_gold_and_survives_the_cache_worker_kill() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(require(is_root(), "root (loop devices, FUSE mounts, tenant uids)")
        && require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE, BOB],
        tenant_lines: vec![("alice", "read_cache_root = \"{root}/cache\"".into())],
        ..Options::default()
    });
    // Gold (first half a pattern), its cache in the cache root.
    let gold = h.vhd_image(ALICE.name, "gold.vhd", SIZE_MIB);
    let data = pattern(SIZE_MIB as usize * MIB / 2, 31);
    vhd_write(&gold, 0, &data);
    let dir = h.root(ALICE.name).join("cache");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    let cache = dir.join("gold.vhdcache");
    h.vhd_snapshot(&cache, &gold);
    let mut want_gold = data;
    want_gold.resize(SIZE_MIB as usize * MIB, 0);

    // A: the read cache; one full read fills it.
    let a = attach(&h);
    let ca = format!("vhd:{}", cache.display());
    h.ok(
        &ALICE,
        &["open", "-p", &a.pid, "-m", &a.minor, "-a", &ca, "-r"],
    );
    assert!(read_all(&a.dev) == want_gold, "A: the gold's data");
    let am: u64 = a.minor.parse().unwrap();
    let sa = stats(&h, am);
    assert!(
        sa["read_cache"]["filled"].as_u64().unwrap_or(0) >= DISK_SECTORS,
        "A filled its cache: {sa}"
    );

    // The VM's leaf: a child of the cache (SM's local leaf).
    let leaf = h.root(ALICE.name).join("vm.vhdcache");
    h.vhd_snapshot(&leaf, &cache);
    let mut model = want_gold.clone();

    // Another tenant cannot base a clone on Alice's cache minor.
    let bpid = h.ok(&BOB, &["spawn"]).trim().to_string();
    let bdev = h.ok(&BOB, &["allocate"]);
    let bminor = bdev.trim().rsplit("tapdev").next().unwrap().to_string();
    h.ok(&BOB, &["attach", "-p", &bpid, "-m", &bminor]);
    let bob_leaf = h.vhd_image(BOB.name, "b.vhd", SIZE_MIB);
    let bl = format!("vhd:{}", bob_leaf.display());
    let e = h.fails(
        &BOB,
        &[
            "open", "-p", &bpid, "-m", &bminor, "-a", &bl, "-e", &a.minor,
        ],
    );
    assert!(
        h.audit_lines()
            .iter()
            .any(|l| l["rule"].as_str() == Some("foreign-parent")),
        "Bob's -e on Alice's cache minor is denied by policy and audited: {e}"
    );

    // B: `open -e A` on the leaf.
    let b = attach(&h);
    let lb = format!("vhd:{}", leaf.display());
    h.ok(
        &ALICE,
        &[
            "open", "-p", &b.pid, "-m", &b.minor, "-a", &lb, "-e", &a.minor,
        ],
    );
    let bm: u64 = b.minor.parse().unwrap();
    assert!(read_all(&b.dev) == model, "B: leaf over cache over gold");
    let sb = stats(&h, bm);
    assert_eq!(
        sb["images"][1]["name"].as_str(),
        Some(cache.to_str().unwrap()),
        "B's parent is A's cache: {sb}"
    );
    assert!(
        layer_reads(&sb, 1) >= DISK_SECTORS,
        "every parent sector B read came from the cache: {sb}"
    );
    assert_eq!(layer_reads(&sb, 2), 0, "nothing from gold: {sb}");
    assert!(
        h.audit_lines().iter().any(|l| l
            .to_string()
            .contains("parent reads go through read cache minor")),
        "the -e open is audited"
    );

    // B is the VM's writable disk: its writes land in its leaf (never the
    // cache), and B reads them from there.
    let cache_before = fs::read(&cache).unwrap();
    let w = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&b.dev)
        .unwrap();
    let own = pattern(MIB, 32);
    let mut buf = Aligned::new(MIB);
    buf.buf().copy_from_slice(&own);
    w.write_all_at(buf.buf(), MIB as u64).unwrap();
    w.sync_all().unwrap();
    drop(w);
    model[MIB..2 * MIB].copy_from_slice(&own);
    let before = stats(&h, bm);
    assert!(read_all(&b.dev) == model, "B after its write");
    let after = stats(&h, bm);
    assert!(
        layer_reads(&after, 0) >= layer_reads(&before, 0) + 2048,
        "B's own MiB came from its leaf: {after}"
    );
    assert!(
        fs::read(&cache).unwrap() == cache_before,
        "B never wrote the cache"
    );

    // A's worker dies: B keeps serving; A is respawned beside B (the two
    // claims on the cache file coexist) and serves again.
    let apid = entry(&h, am)["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(apid as i32, libc::SIGKILL) };
    assert!(read_all(&b.dev) == model, "B while A is dead or respawning");
    assert!(
        eventually(Duration::from_secs(30), || {
            let e = entry(&h, am);
            e["restarts"].as_u64() == Some(1) && e["pid"].as_u64() != Some(apid)
        }),
        "A was not respawned\n{}",
        h.broker_log()
    );
    assert!(read_all(&a.dev) == want_gold, "A after its respawn");
    assert!(read_all(&b.dev) == model, "B after A's respawn");

    // Close in SM's order: the leaf, then the cache.
    h.ok(
        &ALICE,
        &["close", "-p", &b.pid, "-m", &b.minor, "-t", "120"],
    );
    let apid = entry(&h, am)["pid"].as_u64().unwrap().to_string();
    h.ok(&ALICE, &["close", "-p", &apid, "-m", &a.minor, "-t", "120"]);
}
