//! tap-broker's command line, without starting a broker (also makes
//! `cargo test --workspace` build the binary the e2e tests drive).

use std::process::Command;
use std::time::Duration;
use tapjail_testsupport::{is_root, output_within, require};

fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tap-broker"))
}

#[test]
fn cli_print_default_config_is_a_valid_root_only_policy() {
    let out = broker().arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("socket = \"/run/tapjail/broker.sock\""));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(&p, &text).unwrap();
    let out = broker()
        .args(["--check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 tenant(s))"));
}

#[test]
fn cli_bad_config_fails_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "worker_uids = [0, 5]\n[[tenant]]\nname = \"a\"\nuids = [7]\n",
    )
    .unwrap();
    let out = broker()
        .args(["--check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:1:15: worker_uids must not include uid 0"),
        "{err}"
    );
}

#[test]
fn cli_missing_config_file_is_a_clear_error() {
    let out = broker()
        .args(["--config", "/nonexistent/policy.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/policy.toml"));
}

#[test]
fn cli_example_policy_in_the_repo_is_valid() {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/policy.example.toml");
    let out = broker().args(["--check", "--config", p]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 tenant(s))"));
}

/// `tap-broker --check --config PATH`, failing the test if it hangs.
fn check_within_10s(p: &std::path::Path) -> std::process::Output {
    output_within(
        broker().args(["--check", "--config"]).arg(p),
        Duration::from_secs(10),
    )
}

#[test]
fn cli_config_that_is_a_fifo_or_endless_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = check_within_10s(&fifo);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a regular file"), "{err}");
    let out = check_within_10s(std::path::Path::new("/dev/zero"));
    assert!(!out.status.success());
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).unwrap();
    let out = check_within_10s(&big);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than"), "{err}");
}

/// A policy in `dir` with everything under it, plus `extra` lines.
fn policy_in(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let d = dir.display();
    let p = dir.join("policy.toml");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::write(
        &p,
        format!(
            "state_dir = \"{d}/state\"\ndevice_dir = \"{d}/dev\"\nworker_uids = [610200, 610209]\n\
             frontend = \"nbd\"\n{extra}\n[[tenant]]\nname = \"root\"\nuids = [0]\n\
             image_roots = [\"{d}/img\"]\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn cli_start_failures_name_the_setting_and_say_each_cause_once() {
    if !require(is_root(), "tap-broker only starts as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // The socket path is taken by a regular file: refused before the
    // broker announces it serves anything.
    std::fs::write(dir.path().join("taken"), b"").unwrap();
    let p = policy_in(
        dir.path(),
        &format!("socket = \"{d}/taken\"\naudit_log = \"{d}/a.jsonl\""),
    );
    let out = check_within_10s_start(&p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is not a socket"), "{err}");
    assert!(!err.contains("serving"), "{err}");
    // An audit log whose directory cannot be made.
    let p = policy_in(
        dir.path(),
        &format!("socket = \"{d}/b.sock\"\naudit_log = \"/proc/tapjail-qa/audit.jsonl\""),
    );
    let out = check_within_10s_start(&p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("audit_log"), "{err}");
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
}

/// Start tap-broker for real; it must fail (and so exit) within 10 s.
fn check_within_10s_start(p: &std::path::Path) -> std::process::Output {
    output_within(broker().arg("--config").arg(p), Duration::from_secs(10))
}
