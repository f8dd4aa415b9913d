//! XAPI's tap-ctl flags where the SM harness (`tests/xapi_sm.rs`) cannot
//! go: a tapdisk that never answers a bounded close, and `major` on a
//! frontend that makes no block device.

use crate::*;
use std::time::Duration;

/// Send `sig` to one of our broker's workers.
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
}

fn state_of(h: &Harness, minor: &str) -> Option<String> {
    let out = h.ok(&ROOT, &["list", "-m", minor]);
    out.split_whitespace()
        .find_map(|f| f.strip_prefix("state=").map(str::to_string))
}

#[test]
fn xapi_close_t_on_a_tapdisk_that_never_answers_times_out_and_list_shows_the_minor() {
    let h = Harness::start(Options::default());
    let img = h.vhd_image("ops", "t.vhd", 8);
    h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", img.display())]);
    let row = h.ok(&ROOT, &["list", "-m", "0"]);
    let pid = pid_field(&row).unwrap_or_else(|| panic!("list: {row:?}")) as i32;
    signal(pid, libc::SIGSTOP);
    let out = h.ctl(
        &ROOT,
        &["close", "-m", "0", "-p", &pid.to_string(), "-t", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(110), "ETIMEDOUT expected: {err}");
    assert!(err.contains("timed out") && err.contains("-t 1 s"), "{err}");
    // The late worker was killed (its answer would have come after the
    // next question); without respawn, list shows the minor DEAD.
    assert!(
        eventually(Duration::from_secs(20), || state_of(&h, "0").as_deref()
            == Some("0x1")),
        "list: {:?}",
        h.ok(&ROOT, &["list"])
    );
    let lines = h.audit_lines();
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("timed out"))),
        "the timed-out close is not on record"
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert_eq!(h.ok(&ROOT, &["list"]), "");
}

#[test]
fn xapi_major_on_the_nbd_frontend_is_refused_as_unsupported_not_a_usage_error() {
    let h = Harness::start(Options::default());
    let out = h.ctl(&ROOT, &["major"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(95), "{err}");
    assert!(
        err.contains("nbd") && err.contains("no block device"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn xapi_open_d_holds_through_a_respawn_and_a_plain_open_stays_direct() {
    use tapjail_testsupport::{dir_supports_o_direct, holds_open_direct, require};
    let h = Harness::start(Options {
        respawn: true,
        ..Options::default()
    });
    if !require(
        dir_supports_o_direct(&h.root("ops")),
        "O_DIRECT on the test directory's filesystem",
    ) {
        return;
    }
    let buffered = h.vhd_image("ops", "buffered.vhd", 8);
    let direct = h.vhd_image("ops", "direct.vhd", 8);
    h.ok(&ROOT, &["allocate"]);
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    h.ok(&ROOT, &["attach", "-p", &pid, "-m", "0"]);
    h.ok(
        &ROOT,
        &[
            "open",
            "-p",
            &pid,
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", buffered.display()),
            "-D",
            "-t",
            "30",
        ],
    );
    h.ok(
        &ROOT,
        &["create", "-a", &format!("vhd:{}", direct.display())],
    );
    let first: u32 = pid.parse().unwrap();
    assert_eq!(holds_open_direct(first, &buffered), Some(false), "-D");
    let other = h.worker_pid_of("1").expect("minor 1's tapdisk");
    assert_eq!(holds_open_direct(other, &direct), Some(true), "no -D");
    // The respawned tapdisk opens the image the way the open asked.
    signal(first as i32, libc::SIGKILL);
    assert!(
        eventually(Duration::from_secs(20), || h
            .worker_pid_of("0")
            .is_some_and(
                |p| p != first && holds_open_direct(p, &buffered).is_some()
            )),
        "no respawn: {}",
        h.ok(&ROOT, &["list"])
    );
    let second = h.worker_pid_of("0").unwrap();
    assert_eq!(
        holds_open_direct(second, &buffered),
        Some(false),
        "-D lost on respawn"
    );
    // A new open on the same minor without -D is direct again.
    h.ok(&ROOT, &["close", "-m", "0", "-t", "120"]);
    h.ok(
        &ROOT,
        &[
            "open",
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", buffered.display()),
        ],
    );
    assert_eq!(holds_open_direct(second, &buffered), Some(true));
}

#[test]
fn xapi_open_t_on_a_tapdisk_that_never_answers_times_out_and_list_shows_it_dead() {
    let h = Harness::start(Options::default());
    let img = h.vhd_image("ops", "o.vhd", 8);
    h.ok(&ROOT, &["allocate"]);
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    h.ok(&ROOT, &["attach", "-p", &pid, "-m", "0"]);
    signal(pid.parse().unwrap(), libc::SIGSTOP);
    let spec = format!("vhd:{}", img.display());
    let out = h.ctl(
        &ROOT,
        &["open", "-p", &pid, "-m", "0", "-a", &spec, "-t", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(110), "ETIMEDOUT expected: {err}");
    assert!(err.contains("timed out"), "{err}");
    let dead =
        |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).is_ok_and(|v| v & 1 == 1);
    assert!(
        eventually(Duration::from_secs(20), || state_of(&h, "0")
            .is_some_and(|s| dead(&s))),
        "list: {:?}",
        h.ok(&ROOT, &["list"])
    );
    // The failed open left the image unclaimed: it opens on another
    // minor while minor 0 is still dead.
    h.ok(&ROOT, &["create", "-a", &spec]);
    h.ok(&ROOT, &["destroy", "-m", "0"]);
}
