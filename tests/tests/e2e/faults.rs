//! Workers that die or hang: seen at once, shown DEAD, audited, released
//! by destroy/free; replaced when respawn is on; a hung worker is killed at
//! its deadline and never stalls the broker.

use crate::*;
use std::time::Duration;

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
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            "same NBD socket serves"
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
    let h = std::sync::Arc::new(h);
    let h2 = h.clone();
    let slow = std::thread::spawn(move || {
        h2.fails(&ALICE, &["create", "-a", &format!("aio:{}", img.display())])
    });
    // Meanwhile others are served.
    std::thread::sleep(Duration::from_millis(300));
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
    let err = h.fails(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    assert!(err.contains("tapdisk"), "{err}");
    assert_eq!(h.ok(&ALICE, &["list"]), "");
    assert!(eventually(Duration::from_secs(5), || workers_of(
        h.broker_pid()
    )
    .is_empty()));
}
