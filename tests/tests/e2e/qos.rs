//! I/O limits end to end (issue 14): a real broker and real workers on the
//! NBD frontend, driven by qemu-io. Each test sends many writes at once
//! and checks what the worker's bucket did against the configured rate,
//! from `tap-ctl stats`: the schedule the bucket computed, not the wall
//! clock, so a loaded host cannot make these pass or fail.

use crate::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const N: u64 = 40;

/// `n` 4 KiB writes issued together (qemu-io's aio), then a flush.
fn burst_of_writes(sock: &Path, n: u64) -> Command {
    burst_of_writes_at(sock, n, 0)
}

/// [`burst_of_writes`] from 4 KiB slot `first` on.
fn burst_of_writes_at(sock: &Path, n: u64, first: u64) -> Command {
    // The export is named after the device (`tapdevN`, as the socket).
    let export = sock.file_stem().unwrap().to_str().unwrap();
    let mut c = Command::new("qemu-io");
    c.args([
        "-f",
        "raw",
        &format!("nbd+unix:///{export}?socket={}", sock.display()),
    ]);
    for i in first..first + n {
        c.args(["-c", &format!("aio_write -q {} 4k", i * 4096)]);
    }
    c.args(["-c", "aio_flush"]).stdin(Stdio::null());
    c
}

fn write_burst(h: &Harness, sock: &Path, n: u64) {
    let out = burst_of_writes(sock, n)
        .output()
        .expect("qemu-io (qemu-utils) is needed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("fail"),
        "{text}\n--- broker log ---\n{}",
        h.broker_log()
    );
}

/// Create a 1 MiB raw disk for `t`; its minor and NBD socket.
fn disk(h: &Harness, t: &TenantSpec, file: &str) -> (String, PathBuf) {
    let img = h.raw_image(t.name, file, 1 << 20);
    let dev = h.ok(t, &["create", "-a", &format!("aio:{}", img.display())]);
    let minor = dev
        .trim()
        .rsplit("tapdev")
        .next()
        .expect("device path ends in tapdevN")
        .to_string();
    let sock = std::fs::read_link(h.devices.join(format!("tapdev{minor}"))).unwrap();
    (minor, sock)
}

fn throttle(h: &Harness, t: &TenantSpec, minor: &str) -> serde_json::Value {
    let s: serde_json::Value = serde_json::from_str(&h.ok(t, &["stats", "-m", minor])).unwrap();
    s["throttle"].clone()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The bucket let `n` writes go over at least `(n - burst) / rate`
/// seconds, i.e. no faster than the limit; some had to wait.
fn assert_paced(th: &serde_json::Value, n: u64, rate: u64, burst: u64) {
    assert_eq!(u(&th["paced"][0]), 0, "reads are not limited: {th}");
    assert!(u(&th["paced"][1]) >= n, "{th}");
    assert!(u(&th["delayed"][1]) >= 1, "{th}");
    let span = u(&th["last_release_us"][1]) - u(&th["first_release_us"][1]);
    assert!(
        span >= (n - burst) * 1_000_000 / rate,
        "{span} us for {n} writes: {th}"
    );
}

#[test]
fn qos_policy_disk_limit_paces_writes_and_stats_show_it() {
    let h = Harness::start(Options {
        tenant_lines: vec![(
            "alice",
            "disk_io = { write_iops = 20, write_iops_burst = 5 }".into(),
        )],
        ..Options::default()
    });
    let (m, sock) = disk(&h, &ALICE, "a.img");
    write_burst(&h, &sock, N);
    let th = throttle(&h, &ALICE, &m);
    assert_eq!(th["disk"]["write_iops"]["per_sec"], 20, "{th}");
    assert_eq!(th["disk"]["write_iops"]["burst"], 5, "{th}");
    assert!(th["tenant"]["write_iops"].is_null(), "{th}");
    assert_paced(&th, N, 20, 5);
    // bob's disks have no limits: nothing paced.
    let (bm, bsock) = disk(&h, &BOB, "b.img");
    write_burst(&h, &bsock, N);
    assert_eq!(throttle(&h, &BOB, &bm)["paced"], serde_json::json!([0, 0]));
}

#[test]
fn qos_runtime_change_is_admin_only_audited_and_takes_effect() {
    let h = Harness::start(Options::default());
    let (m, sock) = disk(&h, &BOB, "b.img");
    // The tenant may not raise (or set) its own limits.
    let err = h.fails(&BOB, &["throttle", "-m", &m, "--write-iops", "1000"]);
    assert!(err.contains("only an admin tenant"), "{err}");
    let denied = h.audit_lines().into_iter().any(|l| {
        l["decision"] == "deny" && l["rule"] == "throttle-admin-only" && l["peer"]["uid"] == BOB.uid
    });
    assert!(denied, "the refusal is audited");
    // Bad values are refused with the flag named, before anything changes.
    let err = h.fails(&ROOT, &["throttle", "-m", &m, "--write-iops", "10:0"]);
    assert!(
        err.contains("--write-iops 10:0") && err.contains("write_iops_burst"),
        "{err}"
    );
    // The admin limits bob's disk; the live worker takes it at once.
    let out = h.ok(&ROOT, &["throttle", "-m", &m, "--write-iops", "20:5"]);
    assert!(out.contains("write_iops=20:5"), "{out}");
    let line = h
        .audit_lines()
        .into_iter()
        .rev()
        .find(|l| {
            l["request"].to_string().contains("Throttle") || l.to_string().contains("throttle")
        })
        .expect("throttle audited");
    let text = line.to_string();
    assert!(
        text.contains("old [read_iops=off write_iops=off")
            && text.contains("new [read_iops=off write_iops=20:5"),
        "{text}"
    );
    write_burst(&h, &sock, N);
    let th = throttle(&h, &ROOT, &m);
    assert_paced(&th, N, 20, 5);
    // Off again: later writes pass unpaced.
    h.ok(&ROOT, &["throttle", "-m", &m, "--write-iops", "off"]);
    write_burst(&h, &sock, N);
    let after = throttle(&h, &ROOT, &m);
    assert!(after["disk"]["write_iops"].is_null(), "{after}");
    assert_eq!(after["paced"], th["paced"], "{after}");
}

#[test]
fn qos_tenant_limit_is_shared_by_the_tenants_disks_only() {
    let h = Harness::start(Options::default());
    let (m1, s1) = disk(&h, &BOB, "b1.img");
    let (m2, s2) = disk(&h, &BOB, "b2.img");
    let (am, asock) = disk(&h, &ALICE, "a.img");
    let out = h.ok(
        &ROOT,
        &["throttle", "--tenant", "bob", "--write-iops", "20:5"],
    );
    assert!(out.contains("write_iops=20:5"), "{out}");
    // Both of bob's disks at once, and alice's alongside.
    let mut a = burst_of_writes(&s1, N)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut b = burst_of_writes(&s2, N)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    write_burst(&h, &asock, N);
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let t1 = throttle(&h, &ROOT, &m1);
    let t2 = throttle(&h, &ROOT, &m2);
    assert_eq!(t1["tenant"]["write_iops"]["per_sec"], 20, "{t1}");
    assert_eq!(u(&t1["paced"][1]) + u(&t2["paced"][1]), 2 * N);
    // Together, the two workers went no faster than the tenant's rate.
    let first = u(&t1["first_release_us"][1]).min(u(&t2["first_release_us"][1]));
    let last = u(&t1["last_release_us"][1]).max(u(&t2["last_release_us"][1]));
    assert!(
        last - first >= (2 * N - 5) * 1_000_000 / 20,
        "{} us for {} writes on two disks: {t1} {t2}",
        last - first,
        2 * N
    );
    // alice's disk never touched bob's budget.
    assert_eq!(
        throttle(&h, &ALICE, &am)["paced"],
        serde_json::json!([0, 0])
    );
}

/// The pid of the worker serving `minor`, from `list --json`.
fn worker_of(h: &Harness, minor: &str) -> u64 {
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["minor"].as_u64() == minor.parse().ok())
        .and_then(|r| r["pid"].as_u64())
        .unwrap_or_else(|| panic!("minor {minor} not listed with a worker: {rows}"))
}

/// SIGKILL `minor`'s worker and wait until a new one serves it.
fn respawn(h: &Harness, minor: &str) {
    let pid = worker_of(h, minor);
    // SAFETY: kill(2) on a worker pid this test created through the broker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        eventually(std::time::Duration::from_secs(10), || {
            let rows: serde_json::Value =
                serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
            rows.as_array().unwrap().iter().any(|r| {
                r["minor"].as_u64() == minor.parse().ok() && r["state"] == 0 && r["pid"] != pid
            })
        }),
        "minor {minor} was not respawned:\n{}",
        h.broker_log()
    );
}

const TENANT_BPS: u64 = 100 << 20;

fn throttle_bob_at_runtime(h: &Harness, minor: &str) {
    h.ok(&ROOT, &["throttle", "-m", minor, "--write-iops", "20:5"]);
    h.ok(
        &ROOT,
        &[
            "throttle",
            "--tenant",
            "bob",
            "--write-bps",
            &TENANT_BPS.to_string(),
        ],
    );
}

#[test]
fn qos_runtime_limits_survive_a_worker_respawn() {
    let h = Harness::start(Options {
        respawn: true,
        ..Options::default()
    });
    let (m, sock) = disk(&h, &BOB, "b.img");
    throttle_bob_at_runtime(&h, &m);
    respawn(&h, &m);
    write_burst(&h, &sock, N);
    let th = throttle(&h, &ROOT, &m);
    assert_eq!(th["disk"]["write_iops"]["per_sec"], 20, "{th}");
    assert_eq!(th["tenant"]["write_bps"]["per_sec"], TENANT_BPS, "{th}");
    assert_paced(&th, N, 20, 5);
}

#[test]
fn qos_runtime_limits_survive_a_broker_restart() {
    let mut h = Harness::start(Options {
        respawn: true,
        ..Options::default()
    });
    let (m, sock) = disk(&h, &BOB, "b.img");
    throttle_bob_at_runtime(&h, &m);
    h.stop_for_restart();
    h.launch();
    // The new broker's own view of the tenant: a new disk of hers gets
    // the runtime tenant limit, not the policy's (none).
    let (m2, _) = disk(&h, &BOB, "c.img");
    let th2 = throttle(&h, &ROOT, &m2);
    assert_eq!(th2["tenant"]["write_bps"]["per_sec"], TENANT_BPS, "{th2}");
    assert!(th2["disk"]["write_iops"].is_null(), "{th2}");
    assert!(
        h.broker_log().contains("tenant bob: runtime limits"),
        "{}",
        h.broker_log()
    );
    // And of the adopted disk: a worker it respawns gets the runtime
    // disk limit from the records it adopted.
    respawn(&h, &m);
    write_burst(&h, &sock, N);
    let th = throttle(&h, &ROOT, &m);
    assert_eq!(th["disk"]["write_iops"]["per_sec"], 20, "{th}");
    assert_eq!(th["tenant"]["write_bps"]["per_sec"], TENANT_BPS, "{th}");
    assert_paced(&th, N, 20, 5);
}

/// Writes out of tokens wait on their own: a read sent after more
/// delayed writes than the worker has I/O threads completes
/// while nearly all of them still wait. Before reads and writes had
/// queues of their own, the delayed writes held every I/O thread and the
/// read waited for half of them to be released, one a second.
#[test]
fn qos_writes_out_of_tokens_do_not_hold_up_reads() {
    const EACH: u64 = 16; // qemu's NBD client keeps 16 requests in flight
    let h = Harness::start(Options::default());
    let (m, sock) = disk(&h, &BOB, "b.img");
    // The worker sizes its pool from its memlock limit and says so (its
    // line is relayed by the broker's log reader: wait for it).
    assert!(
        eventually(std::time::Duration::from_secs(30), || h
            .broker_log()
            .contains(" I/O threads")),
        "no serving line: {}",
        h.broker_log()
    );
    let log = h.broker_log();
    let said = |what: &str| -> u64 {
        let at = log
            .find(what)
            .unwrap_or_else(|| panic!("no {what:?} in:\n{log}"));
        let head = log[..at].trim_end();
        head[head
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1)..]
            .parse()
            .unwrap_or_else(|_| panic!("no number before {what:?} in:\n{log}"))
    };
    let (threads, clients) = (said(" I/O threads"), said(" clients"));
    // Delayed writes: at least a quarter of a client's worth more than the
    // I/O threads (so the old shared queue would have held every thread
    // and made the read wait for `all - threads` of them, 4 s or more at
    // one write a second), from as many clients as that takes, one
    // connection left for the reader (an 8 MiB memlock admits 2 clients).
    let writers_n = (threads + EACH / 4).div_ceil(EACH);
    assert!(
        writers_n < clients,
        "{threads} I/O threads need {writers_n} writers but only {clients} clients are served"
    );
    let all = writers_n * EACH;
    h.ok(&ROOT, &["throttle", "-m", &m, "--write-iops", "1:1"]);
    let mut writers: Vec<_> = (0..writers_n)
        .map(|c| {
            burst_of_writes_at(&sock, EACH, c * EACH)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-io (qemu-utils) is needed")
        })
        .collect();
    assert!(
        eventually(std::time::Duration::from_secs(60), || u(&throttle(
            &h, &ROOT, &m
        )["paced"][1])
            >= all),
        "the writes did not all reach the throttle: {}",
        throttle(&h, &ROOT, &m)
    );
    // A read of a slot nobody writes: zeroes, at once.
    let export = sock.file_stem().unwrap().to_str().unwrap();
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///{export}?socket={}", sock.display()),
            "-c",
            &format!("read -P 0 {} 4k", (all + 8) * 4096),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("fail"),
        "{text}\n{}",
        h.broker_log()
    );
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", &m])).unwrap();
    let written = u(&stats["secs"][1]) / 8;
    // Sharing the I/O threads, it would have waited for `all - threads`.
    assert!(
        written < all - threads,
        "the read waited for {written} of {all} delayed writes ({threads} I/O threads): {stats}"
    );
    for w in &mut writers {
        let _ = w.kill();
        let _ = w.wait();
    }
}
