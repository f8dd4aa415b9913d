//! tap-ctl's diagnostics are tracing events: JSON lines when stderr is not
//! a terminal (here, a pipe), plain lines with `TAPJAIL_LOG_FORMAT=human`,
//! filtered by `TAPJAIL_LOG`. The confined child of `tap-ctl vhd` logs
//! through the same subscriber under its seccomp filter.

use std::process::{Command, Output};

fn tapctl(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    for k in [
        "TAPJAIL_LOG",
        "RUST_LOG",
        "TAPJAIL_LOG_FORMAT",
        "JOURNAL_STREAM",
    ] {
        c.env_remove(k);
    }
    let out = c.envs(env.iter().copied()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tap-ctl {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// The note about a parent outside the child's directory is logged by the
/// confined child (after its seccomp filter), timestamp and all.
#[test]
fn confined_vhd_child_logs_its_warning_as_a_json_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    let parent = dir.path().join("b/p.vhd");
    let child = dir.path().join("a/c.vhd");
    let p = parent.to_str().unwrap();
    let c = child.to_str().unwrap();
    tapctl(&[], &["vhd", "create", "-n", p, "-s", "8"]);
    let out = tapctl(&[], &["vhd", "snapshot", "-n", c, "-p", p]);
    let ev = events(&out);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let e = &ev[0];
    assert_eq!(e["level"], "WARN");
    assert_eq!(e["target"], "tap_ctl::vhd");
    assert_eq!(e["image"], c);
    assert_eq!(e["parent"], p);
    assert!(e["timestamp"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("is not beneath the directory of"),
        "{e}"
    );
}

#[test]
fn tap_ctl_log_filter_format_and_a_bad_filter() {
    let dir = tempfile::tempdir().unwrap();
    let img = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let create = |env: &[(&str, &str)], name: &str| {
        tapctl(
            env,
            &[
                "vhd",
                "create",
                "-n",
                &img(name),
                "-s",
                "8",
                "--block-size",
                "524288",
            ],
        )
    };
    // Default: the block-size warning, with its field.
    let ev = events(&create(&[], "a.vhd"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["level"], "WARN");
    assert_eq!(ev[0]["block_size"], 524288);
    // The filter silences it.
    let out = create(&[("TAPJAIL_LOG", "error")], "b.vhd");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = create(&[("RUST_LOG", "tap_ctl=error")], "c.vhd");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad filter: said, the default used, the command done.
    let ev = events(&create(&[("TAPJAIL_LOG", "tap_ctl=loud")], "d.vhd"));
    assert_eq!(ev.len(), 2, "{ev:?}");
    let m = ev[0]["message"].as_str().unwrap();
    assert!(
        m.starts_with("TAPJAIL_LOG=\"tap_ctl=loud\" is not a log filter"),
        "{m}"
    );
    assert!(m.contains("using \"info\""), "{m}");
    assert_eq!(ev[1]["block_size"], 524288);
    // Plain lines on request.
    let out = create(&[("TAPJAIL_LOG_FORMAT", "human")], "e.vhd");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.starts_with(" WARN "), "{text}");
    assert!(text.trim_end().ends_with("block_size=524288"), "{text}");
}

/// `JOURNAL_STREAM` naming our stderr picks journald; with no journald
/// socket (this host runs no systemd) the lines fall back to JSON on
/// stderr, and the fallback is said once.
#[test]
fn journald_without_its_socket_falls_back_to_json_lines_and_says_so() {
    if !tapjail_testsupport::require(
        !std::path::Path::new("/run/systemd/journal/socket").exists(),
        "a host without journald (this one has /run/systemd/journal/socket)",
    ) {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("err.txt");
    let file = std::fs::File::create(&err).unwrap();
    let md = file.metadata().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .env_remove("TAPJAIL_LOG")
        .env_remove("RUST_LOG")
        .env_remove("TAPJAIL_LOG_FORMAT")
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .args(["vhd", "create", "-s", "8", "--block-size", "524288", "-n"])
        .arg(dir.path().join("j.vhd"))
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&err).unwrap();
    let ev: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(ev.len(), 2, "{text}");
    let m = ev[0]["message"].as_str().unwrap();
    assert!(
        m.starts_with("journald: ") && m.contains("writing JSON lines to stderr instead"),
        "{m}"
    );
    assert_eq!(ev[1]["block_size"], 524288);
}
