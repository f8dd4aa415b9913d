//! tap-ctl's command line without a broker: usage errors, unreachable
//! broker, offline checks (also makes `cargo test --workspace` build the
//! binary the e2e tests drive).

use std::process::Command;

fn ctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.env_remove("TAPJAIL_SOCKET");
    c
}

#[test]
fn cli_unreachable_broker_names_the_socket_and_the_fix() {
    let out = ctl()
        .args(["--socket", "/nonexistent/b.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach tap-broker at /nonexistent/b.sock"),
        "{err}"
    );
    let out = ctl()
        .env("TAPJAIL_SOCKET", "/nonexistent/env.sock")
        .arg("list")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env.sock"));
}

#[test]
fn cli_misuse_is_a_usage_error_that_contacts_nobody() {
    for args in [
        vec!["attach", "-m", "0"],
        vec!["open", "-m", "0", "-a", "qcow2:/x"],
        vec!["open", "-m", "0", "-a", "/x"],
        vec!["free", "-m", "16384"],
        vec!["free", "-m", "-1"],
        vec!["free"],
        vec!["frobnicate"],
    ] {
        let out = ctl()
            .args(["--socket", "/nonexistent/b.sock"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
            "{args:?}"
        );
    }
}

#[test]
fn cli_audit_verify_and_policy_check_work_offline() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.jsonl");
    std::fs::write(&log, "").unwrap();
    let out = ctl().args(["audit", "verify"]).arg(&log).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&log, "{\"prev\":\"00\"}\n").unwrap();
    let out = ctl().args(["audit", "verify"]).arg(&log).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1:"));
    let pol = dir.path().join("p.toml");
    std::fs::write(&pol, "[[tenant]]\nname = \"a\"\nuids = [1]\nbogus = 1\n").unwrap();
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("p.toml:4:1:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
