//! Leaks, hostile clients, tamper evidence, restarts.

use crate::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

fn dir_entries(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn broker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn cycles_200_create_destroy_leave_nothing_behind() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 4 << 20);
    let spec = format!("aio:{}", img.display());
    let broker = h.broker_pid();
    // Pipes the broker inherited from the test runner stay open throughout.
    let inherited_pipes = pipes_of(broker);
    // One cycle first so that lazily created things (dirs, threads' stacks)
    // exist before we measure.
    h.ok(&ALICE, &["create", "-a", &spec]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert!(eventually(Duration::from_secs(5), || workers_of(broker).is_empty()));
    // A reaped worker's stderr pipe is closed by its log reader once that
    // has drained it, a moment after the reap: wait for that before taking
    // the baseline.
    assert!(eventually(Duration::from_secs(5), || pipes_of(broker)
        == inherited_pipes));
    // Measure once the broker has closed its end of tap-ctl's connection.
    assert!(eventually(Duration::from_secs(10), || control_connections(
        &h
    ) == 0));
    let fds = fd_count(broker);
    for i in 0..200 {
        let dev = h.ok(&ALICE, &["create", "-a", &spec]);
        assert_eq!(
            dev.trim(),
            h.devices.join("tapdev0").to_str().unwrap(),
            "cycle {i}"
        );
        h.ok(&ALICE, &["destroy", "-m", "0"]);
    }
    assert!(
        eventually(Duration::from_secs(5), || workers_of(broker).is_empty()),
        "workers left: {:?}",
        workers_of(broker)
    );
    assert!(
        eventually(Duration::from_secs(5), || fd_count(broker) == fds),
        "broker fds {} -> {}",
        fds,
        fd_count(broker)
    );
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    assert!(
        dir_entries(&h.state.join("minors")).is_empty(),
        "{:?}",
        dir_entries(&h.state.join("minors"))
    );
    assert!(dir_entries(&h.state.join("workers")).is_empty());
    assert!(dir_entries(&h.state.join("nbd")).is_empty());
    assert!(dir_entries(&h.devices).is_empty());
    assert!(
        broker_threads(broker) < 10,
        "threads: {}",
        broker_threads(broker)
    );
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cycles_concurrent_tenants_do_not_interfere() {
    let h = std::sync::Arc::new(Harness::start(Options::default()));
    let mut threads = Vec::new();
    for t in [ALICE, BOB] {
        let h = h.clone();
        threads.push(std::thread::spawn(move || {
            let img = h.raw_image(t.name, "c.img", 1 << 20);
            let spec = format!("aio:{}", img.display());
            for _ in 0..40 {
                let dev = h.ok(&t, &["create", "-a", &spec]);
                let minor = dev.trim().rsplit("tapdev").next().unwrap().to_string();
                h.ok(&t, &["stats", "-m", &minor]);
                h.ok(&t, &["destroy", "-m", &minor]);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    assert!(eventually(Duration::from_secs(5), || workers_of(
        h.broker_pid()
    )
    .is_empty()));
}

#[test]
fn fuzz_frame_stream_never_takes_the_broker_down() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let before = h.ok(&ROOT, &["list"]);
    let fuzz = |uid: u32, seed: u64| {
        let mut c = std::process::Command::new(bin("fuzz-client"));
        c.args([h.socket.to_str().unwrap(), &seed.to_string(), "300"]);
        if uid != 0 {
            std::os::unix::process::CommandExt::uid(&mut c, uid);
            std::os::unix::process::CommandExt::gid(&mut c, uid);
        }
        c.spawn().unwrap()
    };
    // Root (admin), a tenant and a stranger, at once.
    let mut kids = vec![fuzz(0, 1), fuzz(ALICE.uid, 2), fuzz(NOBODY.0, 3)];
    for k in &mut kids {
        let st = k.wait().unwrap();
        assert!(
            st.success(),
            "fuzz client lost the broker\n{}",
            h.broker_log()
        );
    }
    // Still alive, still correct, the disk untouched.
    assert!(alive(h.broker_pid()));
    assert_eq!(h.ok(&ROOT, &["list"]), before);
    h.ok(&ALICE, &["stats", "-m", "0"]);
    let lines = h.audit_lines();
    assert!(
        lines.iter().any(|l| l["event"] == "frame_error"),
        "frame errors audited"
    );
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
fn audit_verify_detects_a_tampered_line() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    h.fails(&BOB, &["destroy", "-m", "0"]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    let log = h.audit.to_str().unwrap();
    let ok = h.ok(&ROOT, &["audit", "verify", log]);
    assert!(ok.contains("chain intact"), "{ok}");
    // Turn bob's denial into an allow.
    let text = std::fs::read_to_string(&h.audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines
        .iter()
        .position(|l| l.contains("\"decision\":\"deny\"") && l.contains("\"uid\":4343"))
        .expect("bob's denial");
    let forged = text.replacen(
        lines[n],
        &lines[n].replace("\"decision\":\"deny\"", "\"decision\":\"allow\""),
        1,
    );
    let copy = h.dir.path().join("forged.jsonl");
    std::fs::write(&copy, forged).unwrap();
    let out = h.ctl(&ROOT, &["audit", "verify", copy.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("line {}:", n + 2))
            && err.contains(&format!("line {} was altered", n + 1)),
        "{err}"
    );
}

#[test]
fn policy_check_reports_line_numbers() {
    let h = Harness::start(Options::default());
    let ok = h.ok(&ROOT, &["policy", "check", h.policy.to_str().unwrap()]);
    assert!(ok.contains(": ok (4 tenant(s)"), "{ok}");
    let bad = h.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "socket = \"/run/x.sock\"\n[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"relative\"]\n[[tenant]]\nname = \"b\"\nuids = [1]\n",
    )
    .unwrap();
    let out = h.ctl(&ROOT, &["policy", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:5:16: image root"), "{err}");
    assert!(err.contains("bad.toml:8:"), "{err}");
    // The broker refuses to start on it, with the same message.
    let out = std::process::Command::new(bin("tap-broker"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:5:16"));
}

/// A crashed broker's disks are adopted by the next one when their fds
/// were kept (`tests/fuse_adopt.rs`); when the fd holder is gone too,
/// nothing can be adopted and everything is taken down, audited.
#[test]
fn restart_after_crash_without_kept_fds_kills_orphans_and_frees_everything() {
    let mut h = Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    });
    let stubborn = h.root("alice").join("s.img");
    std::fs::write(&stubborn, "STUBBORN\n").unwrap();
    h.own(&stubborn);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("aio:{}", stubborn.display())],
    );
    let plain = h.raw_image("bob", "b.img", 1 << 20);
    h.ok(&BOB, &["create", "-a", &format!("aio:{}", plain.display())]);
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    let pids: Vec<u32> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 2);
    let holder = children_of(h.broker_pid())
        .into_iter()
        .find(|p| is_fd_holder(*p))
        .expect("the broker runs an fd holder");
    h.crash();
    // SAFETY: kill(2) on the holder pid found above.
    unsafe { libc::kill(holder as i32, libc::SIGKILL) };
    assert!(eventually(Duration::from_secs(5), || !alive(holder)));
    // The plain worker exits when its broker and the fd holder are gone (the event that
    // shows both noticed); the stubborn one stays.
    assert!(
        eventually(Duration::from_secs(20), || pids
            .iter()
            .filter(|p| alive(**p))
            .count()
            == 1),
        "want exactly the stubborn worker left: {:?}",
        pids.iter().map(|p| (p, alive(*p))).collect::<Vec<_>>()
    );
    assert!(
        h.devices.join("tapdev0").exists(),
        "a crashed broker leaves its devices"
    );
    h.launch();
    assert!(eventually(Duration::from_secs(5), || pids
        .iter()
        .all(|p| !alive(*p))));
    let lines = h.audit_lines();
    let reasons = |event: &str, rule: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["event"] == event && l["rule"] == rule)
            .map(|l| l["reason"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        reasons("adopt", "adopt-worker-refused").len(),
        2,
        "{lines:?}"
    );
    assert_eq!(
        reasons("adopt", "adopt-minor-refused").len(),
        2,
        "{lines:?}"
    );
    let cleanup = reasons("cleanup", "restart-cleanup");
    assert_eq!(
        cleanup.iter().filter(|c| c.contains("freed minor")).count(),
        2,
        "{cleanup:?}"
    );
    assert!(dir_entries(&h.devices).is_empty());
    assert!(dir_entries(&h.state.join("nbd")).is_empty());
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    // Minor 0 is free again, and the audit chain survived the crash.
    let dev = h.ok(&BOB, &["create", "-a", &format!("aio:{}", plain.display())]);
    assert!(dev.trim().ends_with("tapdev0"));
    h.ok(&BOB, &["destroy", "-m", "0"]);
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn restart_second_broker_on_same_socket_is_refused_and_shutdown_cleans_up() {
    let mut h = Harness::start(Options::default());
    let out = std::process::Command::new(bin("tap-broker"))
        .args(["--config", h.policy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another tap-broker serves"));
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let pid = h.broker_pid();
    let kids = children_of(pid);
    assert_eq!(workers_of(pid).len(), 1, "{kids:?}");
    h.stop();
    // SIGINT: the worker and the (now empty) fd holder are gone.
    assert!(eventually(Duration::from_secs(5), || kids
        .iter()
        .all(|k| !alive(*k))));
    assert!(!h.socket.exists());
    assert!(dir_entries(&h.devices).is_empty());
    assert!(dir_entries(&h.state.join("minors")).is_empty());
    let last = h.audit_lines().pop().unwrap();
    assert_eq!(last["event"], "broker_stop", "{last}");
}

#[test]
fn idle_connections_cannot_starve_other_users() {
    let h = Harness::start(Options::default());
    // Root (this test process) opens 8 connections, says Hello (the
    // broker's answer is the definite sign a connection was taken) and
    // then nothing. A connection the broker refuses at once (the
    // harness's start-up probe may still hold a slot for a moment) is
    // replaced.
    use tapjail_common::proto::{Reply, Request, PROTOCOL_VERSION};
    let mut idle = Vec::new();
    while idle.len() < 8 {
        let s = std::os::unix::net::UnixStream::connect(&h.socket).unwrap();
        // A safety limit only: the broker answers either way at once.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        if tapjail_common::frame::send_on(&s, &hello, &[]).is_err() {
            continue; // refused and closed before the Hello went out
        }
        match tapjail_common::frame::recv_on::<_, Reply>(&s, 1 << 20).map(|r| r.0) {
            Ok(Reply::Hello { .. }) => idle.push(s),
            Ok(Reply::Error { message, .. }) if message.contains("connections open") => {}
            other => panic!("connection {}: {other:?}", idle.len()),
        }
    }
    let err = h.fails(&ROOT, &["list"]);
    assert!(err.contains("already has 8 connections open"), "{err}");
    // Everyone else is still served.
    h.ok(&ALICE, &["list"]);
    // Once one of the idle connections closes, root is served again.
    drop(idle.into_iter().next());
    assert!(eventually(Duration::from_secs(10), || h
        .ctl(&ROOT, &["list"])
        .status
        .success()));
    assert!(h.audit_lines().iter().any(|l| l["rule"] == "max-clients"));
}

mod raw {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use tapjail_common::frame;
    use tapjail_common::proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};

    fn hello(s: &UnixStream, version: u32) -> Reply {
        frame::send_on(s, &Request::Hello { version }, &[]).unwrap();
        frame::recv_on::<_, Reply>(s, 1 << 20).unwrap().0
    }

    #[test]
    fn protocol_version_mismatch_is_refused_with_a_clear_error() {
        let h = Harness::start(Options::default());
        let s = UnixStream::connect(&h.socket).unwrap();
        match hello(&s, PROTOCOL_VERSION + 98) {
            Reply::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Version);
                assert!(message.contains("matching versions"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let s = UnixStream::connect(&h.socket).unwrap();
        frame::send_on(
            &s,
            &Request::List {
                pid: None,
                minor: None,
            },
            &[],
        )
        .unwrap();
        match frame::recv_on::<_, Reply>(&s, 1 << 20).unwrap().0 {
            Reply::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Invalid);
                assert!(message.contains("first message must be Hello"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_frame_closes_only_its_own_connection() {
        let h = Harness::start(Options::default());
        let good = UnixStream::connect(&h.socket).unwrap();
        assert!(matches!(
            hello(&good, PROTOCOL_VERSION),
            Reply::Hello { .. }
        ));
        for bad in [
            (u32::MAX).to_be_bytes().to_vec(),       // oversized
            [0, 0, 0, 3, 0xff, 0xff, 0xff].to_vec(), // malformed
            [0, 0, 0, 50, 1, 2].to_vec(),            // truncated
        ] {
            let mut b = UnixStream::connect(&h.socket).unwrap();
            b.write_all(&frame_hello()).unwrap();
            let _ = frame::recv_on::<_, Reply>(&b, 1 << 20).unwrap();
            b.write_all(&bad).unwrap();
            b.shutdown(std::net::Shutdown::Write).unwrap();
            // An error reply, then the broker hangs up.
            let r = frame::recv_on::<_, Reply>(&b, 1 << 20).unwrap().0;
            assert!(
                matches!(
                    r,
                    Reply::Error {
                        kind: ErrorKind::Invalid,
                        ..
                    }
                ),
                "{r:?}"
            );
            let mut rest = Vec::new();
            assert_eq!(b.read_to_end(&mut rest).unwrap(), 0);
        }
        // The good connection is still served, on the same socket.
        frame::send_on(
            &good,
            &Request::List {
                pid: None,
                minor: None,
            },
            &[],
        )
        .unwrap();
        assert!(matches!(
            frame::recv_on::<_, Reply>(&good, 1 << 20).unwrap().0,
            Reply::List(_)
        ));
        let errors = h
            .audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "frame_error")
            .count();
        assert_eq!(errors, 3);
    }

    fn frame_hello() -> Vec<u8> {
        let p = postcard::to_allocvec(&Request::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        let mut v = (p.len() as u32).to_be_bytes().to_vec();
        v.extend(p);
        v
    }
}

#[test]
fn strangers_with_many_uids_cannot_take_every_connection_slot() {
    let h = Harness::start(Options::default());
    // 20 uids that match no tenant (as a user namespace with a subordinate
    // uid range can present), 8 silent connections each: 160 > the 64
    // slots there are.
    let mut hogs: Vec<std::process::Child> = (0..20u32)
        .map(|i| {
            std::process::Command::new(bin("fuzz-client"))
                .args([h.socket.to_str().unwrap(), "1", "8", "hold"])
                .uid(NOBODY.0 + 1 + i)
                .gid(NOBODY.1 + 1 + i)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &mut hogs {
        let mut line = String::new();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.starts_with("held"), "{line}");
    }
    // Every hog is connected (their silent connections live for 5 s):
    // tenants are still served.
    h.ok(&ALICE, &["list"]);
    h.ok(&BOB, &["list"]);
    for mut c in hogs {
        let _ = c.kill();
        let _ = c.wait();
    }
}
