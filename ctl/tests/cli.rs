//! tap-ctl's command line without a broker: usage errors, unreachable
//! broker, offline checks (also makes `cargo test --workspace` build the
//! binary the e2e tests drive).

use std::process::Command;
use tapjail_testsupport::output_within;

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

/// Run tap-ctl; fail the test if it takes longer than `limit`.
fn run_within(mut c: Command, limit: std::time::Duration) -> std::process::Output {
    output_within(&mut c, limit)
}

#[test]
fn cli_broker_that_never_answers_times_out_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Accept and hold every connection, never answering.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let mut c = ctl();
    c.arg("--socket")
        .arg(&sock)
        .args(["--timeout", "2", "list"]);
    let out = run_within(c, std::time::Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not answer")
            && err.contains("2 s")
            && err.contains(&*sock.to_string_lossy()),
        "{err}"
    );
    assert!(!err.contains("os error 11"), "{err}");
}

#[test]
fn cli_peer_that_is_not_tap_broker_is_named_as_such() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(b"\x00\x00\x00\x05hello");
            held.push(s);
        }
    });
    let out = ctl()
        .arg("--socket")
        .arg(&sock)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is it tap-broker's socket"), "{err}");
}

#[test]
fn cli_socket_path_that_is_not_a_socket_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("plain");
    std::fs::write(&f, b"").unwrap();
    let out = ctl().arg("--socket").arg(&f).arg("list").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
}

#[test]
fn cli_list_unknown_type_is_a_usage_error() {
    let out = ctl()
        .args(["--socket", "/nonexistent/b.sock", "list", "-t", "qcow2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn cli_policy_check_and_audit_verify_on_a_fifo_or_device_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for args in [
        vec!["policy", "check", fifo.to_str().unwrap()],
        vec!["audit", "verify", fifo.to_str().unwrap()],
        vec!["policy", "check", "/dev/zero"],
    ] {
        let mut c = ctl();
        c.args(&args);
        let out = run_within(c, std::time::Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }
}

#[test]
fn cli_policy_check_warns_about_missing_and_shared_image_roots() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("srv");
    std::fs::create_dir(&shared).unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(
        &pol,
        format!(
            "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"{}\"]\n\
             [[tenant]]\nname = \"b\"\nuids = [2]\nimage_roots = [\"{}/b\", \"/nonexistent/x\"]\n",
            shared.display(),
            shared.display()
        ),
    )
    .unwrap();
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    // Warnings, not errors: the file is usable.
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.toml:8:") && err.contains("warning") && err.contains("/nonexistent/x"),
        "{err}"
    );
    assert!(
        err.contains("p.toml:8:") && err.contains("tenant \"a\""),
        "{err}"
    );
}

#[test]
fn cli_policy_check_warns_about_a_root_reached_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(
        &pol,
        format!(
            "[[tenant]]\nname = \"a\"\nuids = [1]\nimage_roots = [\"{}\", \"{}\"]\n",
            real.display(),
            link.display()
        ),
    )
    .unwrap();
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let real = std::fs::canonicalize(&real).unwrap();
    assert!(
        err.contains("p.toml:4:")
            && err.contains(&format!(
                "{} of tenant \"a\" is reached through a symlink",
                link.display()
            ))
            && err.contains(&format!("(it is {})", real.display())),
        "{err}"
    );
    assert_eq!(
        err.matches("reached through a symlink").count(),
        1,
        "only the link warns: {err}"
    );
}

#[test]
fn cli_relative_image_path_without_a_current_directory_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && rmdir '{}' && exec '{}' --socket /nonexistent/b.sock create -a vhd:x.vhd",
            gone.display(),
            gone.display(),
            env!("CARGO_BIN_EXE_tap-ctl")
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("x.vhd") && err.contains("current directory"),
        "{err}"
    );
}
