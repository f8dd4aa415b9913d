//! Slow peers cannot hold the broker: a client trickling a frame, a worker
//! answering each of an open's parent requests just in time, and a tenant
//! matched by group with many member uids are each cut off by a bound
//! that covers the whole frame, the whole operation, or the whole tenant.

use crate::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapjail_common::frame;
use tapjail_common::proto::{Reply, Request, PROTOCOL_VERSION};

#[test]
fn deadline_client_trickling_a_frame_is_disconnected_within_the_frame_deadline() {
    let h = Harness::start(Options {
        extra: "client_frame_timeout_secs = 2\n".into(),
        ..Options::default()
    });
    // Root is the `ops` tenant: a peer that may talk, not a stranger.
    let s = UnixStream::connect(&h.socket).unwrap();
    frame::send_on(
        &s,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
        &[],
    )
    .unwrap();
    let (r, _): (Reply, _) = frame::recv_on(&s, 1 << 20).unwrap();
    assert!(matches!(r, Reply::Hello { .. }), "{r:?}");
    // A 1000-byte frame, one byte every 200 ms: each byte far inside the
    // broker's 60 s idle timeout, the whole frame would take 200 s.
    let stop = Arc::new(AtomicBool::new(false));
    let mut w = s.try_clone().unwrap();
    let st = Arc::clone(&stop);
    let started = Instant::now();
    let trickler = std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut bytes = 1000u32.to_be_bytes().to_vec();
        bytes.resize(1004, 0);
        for b in bytes {
            if st.load(Ordering::SeqCst) {
                break;
            }
            if w.write_all(&[b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        sent
    });
    // The disconnect is what we wait for (a safety limit far above the
    // deadline keeps a regression from hanging the suite).
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let end = (&s).read_to_end(&mut got);
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let sent = trickler.join().unwrap();
    // EOF, or a reset: the broker closed with trickled bytes unread.
    assert!(
        end.as_ref().map_or_else(
            |e| e.kind() == std::io::ErrorKind::ConnectionReset,
            |_| true
        ),
        "no disconnect within 30 s: {end:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "disconnected after {took:?}"
    );
    assert!(sent < 100, "the broker read {sent} trickled bytes");
    // It said why before closing.
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("before the deadline"), "{text}");
    assert!(h.audit_lines().iter().any(|l| l["rule"] == "frame"
        && l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("before the deadline"))));
    // The broker serves others as before.
    h.ok(&ALICE, &["list"]);
}

#[test]
fn deadline_worker_answering_each_parent_request_in_time_cannot_stretch_an_open() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        worker_timeout_secs: 2,
        extra: "operation_timeout_secs = 4\n".into(),
        ..Options::default()
    });
    h.raw_image("alice", "base.img", 1 << 20);
    // 30 parent requests, one a second: each within the 2 s per-message
    // timeout, 30 s in all (and a chain of 31 images is within limits).
    let img = h.root("alice").join("slow.img");
    std::fs::write(&img, b"SLOWPARENT:30:1000:base.img\n").unwrap();
    h.own(&img);
    let t0 = Instant::now();
    let err = h.fails(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let took = t0.elapsed();
    assert!(
        err.contains("operation deadline") && err.contains("killed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "create took {took:?}");
    let parents = h
        .audit_lines()
        .into_iter()
        .filter(|l| {
            l["event"] == "parent_open" && l["decision"] == "allow" && l["outcome"] != "pending"
        })
        .count();
    assert!((2..=5).contains(&parents), "{parents} parents opened");
    // Nothing of alice's is left, the worker is gone, the broker serves.
    assert!(eventually(Duration::from_secs(10), || h
        .ok(&ALICE, &["list"])
        .is_empty()));
    assert!(
        eventually(Duration::from_secs(10), || workers_of(h.broker_pid())
            .is_empty()),
        "worker not reaped: {:?}",
        workers_of(h.broker_pid())
    );
    h.ok(&BOB, &["list"]);
}

#[test]
fn deadline_group_tenant_with_many_member_uids_is_held_to_the_tenant_cap() {
    // `staff` is matched by gid: each member uid has its own per-uid cap
    // of 8, the tenant as a whole has the default max_clients of 16.
    let staff_gid = 4600;
    let h = Harness::start(Options {
        extra: format!("\n[[tenant]]\nname = \"staff\"\ngids = [{staff_gid}]\n"),
        ..Options::default()
    });
    let mut hogs = Vec::new();
    let mut greeted = 0;
    let mut refusal = String::new();
    // Four members, one after another (so that the count is exact), each
    // trying for 8 connections.
    for i in 0..4u32 {
        let mut c = std::process::Command::new(bin("fuzz-client"))
            .args([h.socket.to_str().unwrap(), "1", "8", "hellohold"])
            .uid(4601 + i)
            .gid(staff_gid)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let n: usize = line
            .strip_prefix("greeted ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        greeted += n;
        if refusal.is_empty() && !line.ends_with(": \n") {
            refusal = line.clone();
        }
        hogs.push(c);
    }
    assert_eq!(greeted, 16, "the staff tenant holds {greeted} connections");
    assert!(
        refusal.contains("tenant staff already has 16 connections"),
        "{refusal}"
    );
    // Other tenants are served meanwhile.
    h.ok(&ALICE, &["list"]);
    // Its slots come back when it lets go.
    for mut c in hogs {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    let again = || {
        let out = std::process::Command::new(bin("fuzz-client"))
            .args([h.socket.to_str().unwrap(), "1", "1", "hellohold"])
            .uid(4601)
            .gid(staff_gid)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).starts_with("greeted 1 ")
    };
    assert!(eventually(Duration::from_secs(10), again));
}
