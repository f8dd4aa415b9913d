//! The audit log's filesystem fills up (a real ENOSPC, on a small tmpfs):
//! the request whose decision cannot be written is refused, saying why,
//! and nothing of it is done; the torn line is cut back so the chain still
//! verifies; the broker stays closed until it is restarted with room.
//! (`faults.rs` makes the log fail with EPERM, a write error of another
//! kind, mid-run.)

use crate::*;
use std::os::unix::net::UnixStream;
use tapjail_common::frame;
use tapjail_common::proto::{ImageKind, ImageSpec, Reply, Request, PROTOCOL_VERSION};
use tapjail_testsupport::{require, Tmpfs};

fn len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Free bytes left in the audit file's last page: all a full tmpfs will
/// still take (every other page is the filler's).
fn slack(audit: &std::path::Path) -> u64 {
    (4096 - len(audit) % 4096) % 4096
}

#[test]
fn audit_log_on_a_full_filesystem_refuses_create_and_nothing_is_done() {
    if !require(
        tapjail_testsupport::is_root(),
        "mounting a tmpfs needs root",
    ) {
        return;
    }
    let mut h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    let spec = ImageSpec {
        kind: ImageKind::Aio,
        path: img.display().to_string(),
    };
    // Move the log onto a 64 KiB tmpfs (with the broker stopped, so it
    // reopens it there).
    h.stop();
    let log = std::fs::read(&h.audit).unwrap();
    let _fs = Tmpfs::mount(h.audit.parent().unwrap(), 64 << 10);
    std::fs::write(&h.audit, &log).unwrap();
    h.launch();
    // One create and destroy: the create's decision line is how much room
    // the next one needs.
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    let text = std::fs::read_to_string(&h.audit).unwrap();
    let need = text
        .lines()
        .filter(|l| l.contains("\"pending\"") && l.contains("Create"))
        .map(|l| l.len() as u64 + 1)
        .next_back()
        .expect("the create's decision line");

    let s = UnixStream::connect(&h.socket).unwrap();
    let call = |req: &Request| {
        frame::send_on(&s, req, &[]).unwrap();
        frame::recv_on::<_, Reply>(&s, 1 << 20).unwrap().0
    };
    let hello = call(&Request::Hello {
        version: PROTOCOL_VERSION,
    });
    assert!(matches!(hello, Reply::Hello { .. }), "{hello:?}");

    let filled = _fs.fill("filler");
    assert!(filled > 0, "the tmpfs had no room to fill");
    // Take the last page's room down with `list`s on the same connection
    // (one line each, shorter than a create's) while one surely fits.
    let list = || {
        let r = call(&Request::List {
            pid: None,
            minor: None,
        });
        assert!(matches!(r, Reply::List(_)), "{r:?}");
    };
    let before = len(&h.audit);
    list();
    let per_list = len(&h.audit) - before;
    assert!(
        per_list + 32 < need,
        "a list ({per_list} B of log) must be shorter than a create ({need} B)"
    );
    while slack(&h.audit) >= per_list + 16 {
        list();
    }
    let lines_before = h.audit_lines().len();
    let size_before = len(&h.audit);

    let r = call(&Request::Create {
        image: spec,
        read_only: false,
        minor: None,
    });
    let Reply::Error { message, .. } = &r else {
        panic!("create without an audit record: {r:?}")
    };
    assert!(message.contains("audit log cannot be written"), "{message}");
    assert!(message.contains("No space left on device"), "{message}");
    // Nothing was done: no device, no minor, no socket, no worker.
    let empty =
        |p: std::path::PathBuf| std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none());
    assert!(empty(h.devices.clone()) && empty(h.state.join("nbd")));
    assert!(empty(h.state.join("minors")));
    assert!(workers_of(h.broker_pid()).is_empty());
    // The half-written line was cut back: the log is as it was, and whole.
    assert_eq!(len(&h.audit), size_before, "a torn line was left");
    assert_eq!(h.audit_lines().len(), lines_before);
    // Closed until restarted, even for what would fit.
    assert!(h.fails(&ALICE, &["list"]).contains("audit log"));
    assert!(h.broker_log().contains("refusing all requests from now on"));

    // Room again, and a restart: the chain verifies and the create works.
    std::fs::remove_file(h.audit.parent().unwrap().join("filler")).unwrap();
    h.stop();
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "audit verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.launch();
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    h.stop();
}
