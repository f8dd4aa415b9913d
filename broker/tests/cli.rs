//! tap-broker's command line, without starting a broker (also makes
//! `cargo test --workspace` build the binary the e2e tests drive).

use std::process::Command;

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
