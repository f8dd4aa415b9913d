//! blktap's `kicks` on the ublk frontend, where they mean batching: a
//! wakeup may bring several requests and one `io_uring_enter` may carry
//! several commits, so each kick counts at least one request. Needs
//! ublk_drv: `.ci/nestvm-tests admin_kicks::` runs it inside nestvm.

use crate::*;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use tapjail_testsupport::Aligned;

fn pair(v: &serde_json::Value) -> [u64; 2] {
    [v[0].as_u64().unwrap(), v[1].as_u64().unwrap()]
}

fn tap(h: &Harness, minor: &str) -> ([u64; 2], [u64; 2]) {
    let s: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", minor, "--json"])).unwrap();
    (pair(&s["tap"]["reqs"]), pair(&s["tap"]["kicks"]))
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn admin_kicks_on_ublk_count_wakeups_and_commits_never_more_than_requests() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "no /dev/ublk-control: this test runs inside nestvm (.ci/nestvm-tests)"
    );
    let h = Harness::start(Options {
        frontend: "ublk",
        ..Options::default()
    });
    let img = h.raw_image("alice", "k.img", 8 << 20);
    let c: serde_json::Value = serde_json::from_str(&h.ok(
        &ALICE,
        &["create", "-a", &format!("aio:{}", img.display()), "--json"],
    ))
    .unwrap();
    let minor = c["minor"].to_string();
    let (r0, k0) = tap(&h, &minor);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(c["device"].as_str().unwrap())
        .unwrap();
    let mut buf = Aligned::new(4096);
    for i in 0..32u64 {
        buf.buf().fill(i as u8);
        f.write_all_at(buf.buf(), i * 4096).unwrap();
        f.read_exact_at(buf.buf(), i * 4096).unwrap();
    }
    let (r1, k1) = tap(&h, &minor);
    let reqs = [r1[0] - r0[0], r1[1] - r0[1]];
    let kicks = [k1[0] - k0[0], k1[1] - k0[1]];
    assert!(reqs[0] >= 64 && reqs[1] >= 64, "reqs {reqs:?}");
    assert!(kicks[0] >= 1 && kicks[1] >= 1, "kicks {kicks:?}");
    assert!(
        kicks[0] <= reqs[0] && kicks[1] <= reqs[1],
        "each kick brings or returns at least one request: kicks {kicks:?}, reqs {reqs:?}"
    );
    h.ok(&ALICE, &["destroy", "-m", &minor]);
}
