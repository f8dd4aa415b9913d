//! Workers that die or hang: seen at once, shown DEAD, audited, released
//! by destroy/free; replaced when respawn is on; a hung worker is killed at
//! its deadline and never stalls the broker.

use crate::*;
use std::time::Duration;
use tapjail_testsupport::Immutable;

fn json_rows(h: &Harness, t: &TenantSpec) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&h.ok(t, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a worker pid this test created through the broker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

#[test]
fn faults_sigkilled_worker_shows_dead_and_destroy_releases_it() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let row = json_rows(&h, &ALICE).remove(0);
    let pid = row["pid"].as_u64().unwrap() as u32;
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    sigkill(pid);
    assert!(
        eventually(Duration::from_secs(5), || h
            .ok(&ALICE, &["list"])
            .contains("state=0x1 ")),
        "{}",
        h.ok(&ALICE, &["list"])
    );
    let death = h
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "worker_exit")
        .expect("death audited");
    assert_eq!(death["rule"], "worker-death");
    assert_eq!(death["tenant"], "alice");
    assert!(
        death["reason"].as_str().unwrap().contains("SIGKILL"),
        "{death}"
    );
    assert!(!alive(pid));
    assert!(h.fails(&ALICE, &["stats", "-m", "0"]).contains("is dead"));
    assert!(h.fails(&ALICE, &["pause", "-m", "0"]).contains("is dead"));
    h.ok(&ALICE, &["destroy", "-m", "0", "-p", &pid.to_string()]);
    assert_eq!(h.ok(&ALICE, &["list"]), "");
    assert!(!sock.exists() && !h.devices.join("tapdev0").exists());
}

#[test]
fn faults_dead_worker_can_be_freed_and_unattached_dead_worker_vanishes() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let pid = json_rows(&h, &ALICE)[0]["pid"].as_u64().unwrap() as u32;
    sigkill(pid);
    assert!(eventually(Duration::from_secs(5), || h
        .ok(&ALICE, &["list"])
        .contains("state=0x1")));
    h.ok(&ALICE, &["free", "-m", "0"]);
    assert_eq!(h.ok(&ALICE, &["list"]), "");
    let spare: u32 = h.ok(&ALICE, &["spawn"]).trim().parse().unwrap();
    sigkill(spare);
    assert!(eventually(Duration::from_secs(5), || h
        .ok(&ALICE, &["list"])
        .is_empty()));
}

#[test]
fn faults_respawn_replaces_a_dead_worker_on_the_same_device() {
    let h = Harness::start(Options {
        respawn: true,
        ..Options::default()
    });
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    for round in 1..=3u64 {
        let row = json_rows(&h, &ALICE).remove(0);
        let pid = row["pid"].as_u64().unwrap() as u32;
        sigkill(pid);
        assert!(
            eventually(Duration::from_secs(10), || {
                let r = json_rows(&h, &ALICE);
                r.len() == 1
                    && r[0]["restarts"] == round
                    && r[0]["state"] == 0
                    && r[0]["pid"] != pid
            }),
            "round {round}: {:?}\n{}",
            json_rows(&h, &ALICE),
            h.broker_log()
        );
        // The new worker's log lines reach the broker's log tagged with
        // its minor from the first one: a client that speaks garbage makes
        // it say "dropped during negotiation".
        let new_pid = json_rows(&h, &ALICE)[0]["pid"].as_u64().unwrap();
        let mut garbage =
            std::os::unix::net::UnixStream::connect(&sock).expect("same NBD socket serves");
        std::io::Write::write_all(&mut garbage, &[0xff; 64]).unwrap();
        drop(garbage);
        assert!(
            eventually(Duration::from_secs(10), || worker_events(
                &h.broker_log(),
                new_pid
            )
            .iter()
            .any(|e| e["minor"] == 0 && line_of(e).contains("dropped"))),
            "round {round}: no line of tapdisk[{new_pid}] tagged minor 0:\n{}",
            h.broker_log()
        );
    }
    let respawns = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "worker_respawn" && l["rule"] == "respawn")
        .count();
    assert_eq!(respawns, 3);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
fn faults_hung_worker_is_killed_at_its_deadline_and_broker_keeps_serving() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        worker_timeout_secs: 2,
        ..Options::default()
    });
    let img = h.root("alice").join("hang.img");
    std::fs::write(&img, "HANG\n").unwrap();
    h.own(&img);
    let h = std::sync::Arc::new(h);
    let h2 = h.clone();
    let slow = std::thread::spawn(move || {
        h2.fails(&ALICE, &["create", "-a", &format!("aio:{}", img.display())])
    });
    // Meanwhile (the worker hangs on Open) others are served.
    assert!(
        eventually(Duration::from_secs(30), || h
            .broker_log()
            .contains(": hanging on Open")),
        "the fake worker never got the Open:\n{}",
        h.broker_log()
    );
    let t0 = std::time::Instant::now();
    h.ok(&BOB, &["list"]);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "list waited for the hung worker"
    );
    let err = slow.join().unwrap();
    assert!(
        err.contains("did not answer within 2 s and was killed"),
        "{err}"
    );
    assert_eq!(
        h.ok(&ALICE, &["list"]),
        "",
        "the failed create left nothing"
    );
    assert!(workers_of(h.broker_pid()).is_empty(), "hung worker reaped");
}

#[test]
fn faults_worker_crashing_on_open_fails_the_request_cleanly() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    });
    let img = h.root("alice").join("crash.img");
    std::fs::write(&img, "CRASH\n").unwrap();
    h.own(&img);
    let err = h.fails(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    assert!(err.contains("tapdisk"), "{err}");
    assert_eq!(h.ok(&ALICE, &["list"]), "");
    assert!(eventually(Duration::from_secs(5), || workers_of(
        h.broker_pid()
    )
    .is_empty()));
}

#[test]
fn faults_create_is_refused_and_nothing_exists_when_its_decision_cannot_be_audited() {
    use std::os::unix::net::UnixStream;
    use tapjail_common::frame;
    use tapjail_common::proto::{ImageKind, ImageSpec, Reply, Request, PROTOCOL_VERSION};
    let mut h = Harness::start(Options::default());
    let img = h.raw_image("ops", "a.img", 1 << 20);
    let s = UnixStream::connect(&h.socket).unwrap();
    let call = |req: &Request| {
        frame::send_on(&s, req, &[]).unwrap();
        frame::recv_on::<_, Reply>(&s, 1 << 20).unwrap().0
    };
    let hello = call(&Request::Hello {
        version: PROTOCOL_VERSION,
    });
    assert!(matches!(hello, Reply::Hello { .. }), "{hello:?}");
    let lines_before = h.audit_lines().len();
    // The log fails under the broker's open fd, mid-run.
    let guard = Immutable::set(&h.audit);
    let r = call(&Request::Create {
        image: ImageSpec {
            kind: ImageKind::Aio,
            path: img.display().to_string(),
        },
        read_only: false,
        minor: None,
    });
    let Reply::Error { message, .. } = &r else {
        panic!("create without an audit record: {r:?}")
    };
    assert!(message.contains("audit log cannot be written"), "{message}");
    // Nothing was done: no device, no minor, no worker, no record.
    let empty =
        |p: std::path::PathBuf| std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none());
    assert!(empty(h.devices.clone()) && empty(h.state.join("nbd")));
    assert!(std::fs::read_dir(h.state.join("minors"))
        .unwrap()
        .next()
        .is_none());
    assert!(workers_of(h.broker_pid()).is_empty());
    drop(guard);
    assert_eq!(h.audit_lines().len(), lines_before, "no line about it");
    // The broker stays closed until restarted.
    assert!(h.fails(&ROOT, &["list"]).contains("audit log"));
    h.stop();
}

#[test]
fn faults_parent_is_refused_and_nothing_exists_when_its_decision_cannot_be_audited() {
    let h = std::sync::Arc::new(Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    }));
    h.raw_image("alice", "base.img", 1 << 20);
    // Five parent requests, 300 ms apart: the log breaks after the first.
    let img = h.root("alice").join("slow.img");
    std::fs::write(&img, b"SLOWPARENT:5:300:base.img\n").unwrap();
    h.own(&img);
    let h2 = h.clone();
    let spec = format!("aio:{}", img.display());
    let create = std::thread::spawn(move || h2.ctl(&ALICE, &["create", "-a", &spec]));
    let opened = |h: &Harness| {
        h.audit_lines().iter().any(|l| {
            l["event"] == "parent_open"
                && l["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("opened"))
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || opened(&h)),
        "no parent opened:\n{}",
        h.broker_log()
    );
    let guard = Immutable::set(&h.audit);
    let out = create.join().unwrap();
    drop(guard);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "create succeeded without a record");
    assert!(err.contains("audit log cannot be written"), "{err}");
    // Only the first parent was opened, on record; the rest were refused
    // before anything was opened, and nothing of the create is left.
    let parents = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "parent_open")
        .count();
    assert_eq!(parents, 2, "one decision and one outcome line");
    let empty =
        |p: std::path::PathBuf| std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none());
    assert!(empty(h.devices.clone()) && empty(h.state.join("nbd")));
    assert!(empty(h.state.join("minors")));
    assert!(eventually(Duration::from_secs(10), || workers_of(
        h.broker_pid()
    )
    .is_empty()));
}
