//! Online snapshot end to end: a real tap-broker and confined tapdisk
//! workers. Under fio verify on FUSE + loop (root, /dev/fuse, loop), and
//! the refusals on NBD (no kernel device needed).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::{fio_verify_writer, fuse_loop_turn};

fn list(h: &Harness, t: &TenantSpec) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(t, &["list", "--json"])).expect("list --json")
}

fn stats(h: &Harness, t: &TenantSpec, minor: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(t, &["stats", "-m", minor])).expect("stats JSON")
}

/// Write requests the leaf of `minor` has taken (from `stats`).
fn writes(h: &Harness, minor: &str) -> u64 {
    stats(h, &ROOT, minor)["images"][0]["hits"][1]
        .as_u64()
        .expect("write hits")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `tap-ctl vhd check` of an image and its whole chain.
fn vhd_check(vhd: &Path) {
    run_ok(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "check", "-n"])
            .arg(vhd),
    );
}

/// The offline tools follow no `..` locator: a child in a subdirectory
/// names its parent with `--parent` (the broker follows it beneath the
/// tenant's root).
fn vhd_check_with(vhd: &Path, parent: &Path) {
    run_ok(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "check", "-n"])
            .arg(vhd)
            .arg("--parent")
            .arg(parent),
    );
}

/// The stall tap-ctl printed: `snapshot PATH: I/O held X ms (stall_us=N)`.
fn stall_us(out: &str) -> u64 {
    let n = out
        .split("stall_us=")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no stall in {out:?}"));
    n.parse().unwrap_or_else(|_| panic!("bad stall in {out:?}"))
}

/// Snapshot twice while fio writes and verifies through the device: fio
/// sees no error, the old leaves are never written after their switch,
/// every layer checks clean, the stall is printed and in `stats`, and the
/// chain read offline equals what the device served.
#[test]
fn fuse_snapshot_twice_under_fio_verify_loses_nothing_and_reports_the_stall() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let base = h.vhd_image(ROOT.name, "base.vhd", 512);
    let snap1 = h.root(ROOT.name).join("snap1.vhd");
    let snap2 = h.root(ROOT.name).join("snaps").join("snap2.vhd");
    fs::create_dir(snap2.parent().unwrap()).unwrap();
    let dev = PathBuf::from(
        h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", base.display())])
            .trim(),
    );
    let fio = fio_verify_writer(&dev, "384M").spawn().expect("fio");
    let mut olds = Vec::new();
    let mut stalls = Vec::new();
    for (leaf, child) in [(&base, &snap1), (&snap1, &snap2)] {
        // Mid-I/O: writes of this fio run reach the current leaf.
        let w0 = writes(&h, "0");
        assert!(
            eventually(Duration::from_secs(60), || writes(&h, "0") >= w0 + 32),
            "no write progress\n{}",
            h.broker_log()
        );
        let out = h.ok(
            &ROOT,
            &["snapshot", "-m", "0", "-n", &child.display().to_string()],
        );
        stalls.push(stall_us(&out));
        olds.push((leaf.clone(), sha(leaf)));
        assert_eq!(
            list(&h, &ROOT)[0]["file"],
            child.display().to_string(),
            "{out}"
        );
    }
    println!("online snapshot stalls under fio (us): {stalls:?}");
    let s = stats(&h, &ROOT, "0");
    assert_eq!(s["snapshot"]["count"], 2, "{s}");
    assert_eq!(s["snapshot"]["last_stall_us"], stalls[1], "{s}");
    let names: Vec<_> = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [&snap2, &snap1, &base].map(|p| p.display().to_string()),
        "{s}"
    );
    h.fio_finished_ok(fio, "online snapshots");
    // What the device serves now, to compare with the chain offline.
    let served = h.dir.path().join("served.raw");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", dev.display()))
            .arg(format!("of={}", served.display()))
            .args(["bs=1M", "iflag=direct"]),
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    for (old, digest) in &olds {
        assert_eq!(
            &sha(old),
            digest,
            "{} changed after its snapshot",
            old.display()
        );
    }
    vhd_check_with(&snap2, &snap1);
    for img in [&snap2, &snap1, &base] {
        if img != &snap2 {
            vhd_check(img);
        }
        let info = run_ok(
            Command::new("qemu-img")
                .args(["info", "-f", "vpc"])
                .arg(img),
        );
        assert!(info.contains("virtual size: 512 MiB"), "{info}");
    }
    let flat = h.dir.path().join("flat.raw");
    run_ok(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "convert"])
            .arg(&snap2)
            .arg(&flat)
            .arg("--parent")
            .arg(&snap1),
    );
    assert_eq!(
        sha(&flat),
        sha(&served),
        "the chain reads as the device did"
    );
    let audits: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["request"]["Snapshot"].is_object())
        .collect();
    assert_eq!(
        audits.len(),
        4,
        "decision and outcome per snapshot: {audits:?}"
    );
}

/// A worker killed right after a snapshot is replaced by one that opens
/// the child (the broker's record names it), and fio, which goes on
/// writing through both, verifies every block.
#[test]
fn fuse_worker_sigkilled_after_a_snapshot_respawns_on_the_child() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let base = h.vhd_image(ROOT.name, "base.vhd", 256);
    let child = h.root(ROOT.name).join("child.vhd");
    let dev = PathBuf::from(
        h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", base.display())])
            .trim(),
    );
    let fio = fio_verify_writer(&dev, "192M").spawn().expect("fio");
    let w0 = writes(&h, "0");
    assert!(
        eventually(Duration::from_secs(60), || writes(&h, "0") >= w0 + 32),
        "no write progress\n{}",
        h.broker_log()
    );
    h.ok(
        &ROOT,
        &["snapshot", "-m", "0", "-n", &child.display().to_string()],
    );
    let pid = list(&h, &ROOT)[0]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(20), || {
            let l = list(&h, &ROOT);
            l[0]["restarts"] == 1 && l[0]["pid"].as_u64() != Some(pid)
        }),
        "no respawn: {:?}\n{}",
        list(&h, &ROOT),
        h.broker_log()
    );
    let s = stats(&h, &ROOT, "0");
    assert_eq!(s["images"][0]["name"], child.display().to_string(), "{s}");
    assert_eq!(s["images"][1]["name"], base.display().to_string(), "{s}");
    h.fio_finished_ok(fio, "a worker kill");
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    vhd_check(&child);
}

/// The child is the tenant's own file (created with her uid), and every
/// refusal is clear, changes nothing and is audited: a path outside her
/// roots, a name that exists, a tenant whose policy says no, another
/// tenant's disk, a read-only disk.
#[test]
fn nbd_snapshot_child_is_the_tenants_and_refusals_are_clear_and_audited() {
    let h = Harness::start(Options {
        tenant_lines: vec![(BOB.name, "online_snapshot = false".into())],
        ..Options::default()
    });
    let base = h.vhd_image(ALICE.name, "a.vhd", 16);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", base.display())],
    );
    let minor = list(&h, &ALICE)[0]["minor"].as_u64().unwrap().to_string();
    let child = h.root(ALICE.name).join("a-snap.vhd");
    // The child is created with alice's own permissions: in a root that
    // root owns (mode 755) she cannot create it, so neither does the broker.
    let err = h.fails(
        &ALICE,
        &["snapshot", "-m", &minor, "-n", &child.display().to_string()],
    );
    assert!(err.contains("permission denied for uid"), "{err}");
    assert!(!child.exists());
    assert_eq!(list(&h, &ALICE)[0]["file"], base.display().to_string());
    h.own(&h.root(ALICE.name));
    h.own(&h.root(BOB.name));
    let out = h.ok(
        &ALICE,
        &["snapshot", "-m", &minor, "-n", &child.display().to_string()],
    );
    assert!(out.contains("stall_us="), "{out}");
    let md = fs::metadata(&child).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.uid(), md.gid()), (ALICE.uid, ALICE.gid));
    assert_eq!(list(&h, &ALICE)[0]["file"], child.display().to_string());

    let refused = |t: &TenantSpec, m: &str, path: &Path, want: &str| {
        let before: Vec<_> = fs::read_dir(h.root(ALICE.name)).unwrap().collect();
        let err = h.fails(t, &["snapshot", "-m", m, "-n", &path.display().to_string()]);
        assert!(err.contains(want), "{want:?} not in {err:?}");
        let after: Vec<_> = fs::read_dir(h.root(ALICE.name)).unwrap().collect();
        assert_eq!(before.len(), after.len(), "a refused snapshot left a file");
        let last = h.audit_lines().pop().unwrap();
        assert!(last["request"]["Snapshot"].is_object(), "{last}");
        assert!(
            last["decision"] == "deny"
                || last["outcome"].as_str().is_some_and(|o| o.contains(want)),
            "{last}"
        );
        err
    };
    // Outside her roots (bob's root), and a path escaping with `..`.
    refused(
        &ALICE,
        &minor,
        &h.root(BOB.name).join("x.vhd"),
        "outside tenant",
    );
    // The name exists (the base itself, and another file).
    fs::write(h.root(ALICE.name).join("taken.vhd"), b"mine").unwrap();
    h.own(&h.root(ALICE.name).join("taken.vhd"));
    refused(
        &ALICE,
        &minor,
        &h.root(ALICE.name).join("taken.vhd"),
        "already exists",
    );
    assert_eq!(
        fs::read(h.root(ALICE.name).join("taken.vhd")).unwrap(),
        b"mine"
    );
    // Bob may not snapshot alice's disk.
    refused(&BOB, &minor, &h.root(BOB.name).join("b.vhd"), "minor");
    // Bob's own disk, but his policy says no.
    let bbase = h.vhd_image(BOB.name, "b.vhd", 16);
    h.ok(&BOB, &["create", "-a", &format!("vhd:{}", bbase.display())]);
    let bminor = list(&h, &BOB)[0]["minor"].as_u64().unwrap().to_string();
    let err = h.fails(
        &BOB,
        &[
            "snapshot",
            "-m",
            &bminor,
            "-n",
            &h.root(BOB.name).join("bs.vhd").display().to_string(),
        ],
    );
    assert!(err.contains("online_snapshot = false"), "{err}");
    assert!(!h.root(BOB.name).join("bs.vhd").exists());
    // A read-only disk has nothing to snapshot.
    let ro = h.vhd_image(ALICE.name, "ro.vhd", 16);
    h.ok(
        &ALICE,
        &["create", "-R", "-a", &format!("vhd:{}", ro.display())],
    );
    let rominor = list(&h, &ALICE)
        .iter()
        .find(|r| r["file"] == ro.display().to_string())
        .unwrap()["minor"]
        .as_u64()
        .unwrap()
        .to_string();
    refused(
        &ALICE,
        &rominor,
        &h.root(ALICE.name).join("ro-snap.vhd"),
        "read-only",
    );
    // The snapshot that was made is a valid child of the untouched base.
    h.ok(&ALICE, &["destroy", "-m", &minor]);
    vhd_check(&child);
}

/// A broker restarted after a snapshot adopts the worker serving the
/// child: its record names the child, and the worker's account agrees.
#[test]
fn nbd_broker_restart_after_a_snapshot_adopts_the_child() {
    let mut h = Harness::start(Options::default());
    h.own(&h.root(ALICE.name));
    let base = h.vhd_image(ALICE.name, "a.vhd", 16);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", base.display())],
    );
    let child = h.root(ALICE.name).join("a-snap.vhd");
    h.ok(
        &ALICE,
        &["snapshot", "-m", "0", "-n", &child.display().to_string()],
    );
    let pid = list(&h, &ALICE)[0]["pid"].as_u64().unwrap();
    h.stop_for_restart();
    h.launch();
    let row = &list(&h, &ALICE)[0];
    assert_eq!(row["file"], child.display().to_string(), "{row}");
    assert_eq!(
        row["pid"].as_u64(),
        Some(pid),
        "adopted, not replaced: {row}"
    );
    let s = stats(&h, &ALICE, "0");
    assert_eq!(s["images"][1]["name"], base.display().to_string(), "{s}");
}

/// A worker killed while it prepares a snapshot (stopped before it reads
/// the request, then SIGKILLed): the snapshot fails with a message, the
/// half-made child is removed, and the respawned worker serves the old
/// leaf.
#[test]
fn nbd_worker_killed_during_snapshot_prepare_discards_the_child() {
    let h = Harness::start(Options {
        respawn: true,
        ..Options::default()
    });
    h.own(&h.root(ALICE.name));
    let base = h.vhd_image(ALICE.name, "a.vhd", 16);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", base.display())],
    );
    let child = h.root(ALICE.name).join("a-snap.vhd");
    let pid = list(&h, &ALICE)[0]["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let ctl = Command::new(bin("tap-ctl"))
        .arg("--socket")
        .arg(&h.socket)
        .args(["snapshot", "-m", "0", "-n"])
        .arg(&child)
        .env_remove("TAPJAIL_SOCKET")
        .uid(ALICE.uid)
        .gid(ALICE.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tap-ctl snapshot");
    // The broker created the child and is waiting on the stopped worker.
    assert!(
        eventually(Duration::from_secs(20), || child.exists()),
        "no child created\n{}",
        h.broker_log()
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let out = ctl.wait_with_output().unwrap();
    assert!(!out.status.success(), "the snapshot cannot have succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("tapdisk {pid}")), "{err}");
    assert!(!child.exists(), "the unused child was left behind: {err}");
    assert!(
        eventually(Duration::from_secs(20), || {
            let l = list(&h, &ALICE);
            l[0]["restarts"] == 1 && l[0]["pid"].as_i64() != Some(pid.into())
        }),
        "no respawn: {:?}\n{}",
        list(&h, &ALICE),
        h.broker_log()
    );
    assert_eq!(list(&h, &ALICE)[0]["file"], base.display().to_string());
    let last = h
        .audit_lines()
        .into_iter()
        .rfind(|l| l["request"]["Snapshot"].is_object())
        .unwrap();
    assert!(
        last["outcome"].as_str().unwrap().contains("tapdisk"),
        "{last}"
    );
    vhd_check(&base);
}
