//! `tap-broker.service` stays valid and stays hardened: `systemd-analyze
//! verify` finds nothing to say about it, `systemd-analyze security
//! --offline=true` scores it no worse than it does today, and every
//! capability it keeps is explained in a comment.
//!
//! Needs `systemd-analyze` (Debian package `systemd`, installed by
//! `.ci/deps`; it runs without a running systemd). Without it the tests
//! fail under `CI=true` and are skipped, loudly, elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use tapjail_testsupport::require;

/// The exposure `systemd-analyze security` gives the unit now (systemd
/// 252; 8.7 before hardening). Lower it when the unit gets tighter. 3.3
/// before workers got cgroups: `Delegate=yes` and a writable cgroup tree
/// (ProtectControlGroups=no) cost 0.2.
const MAX_EXPOSURE: f64 = 3.5;

fn unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tap-broker.service")
}

/// `systemd-analyze`, or `None` (after saying so) when it is missing and
/// this is not CI (under `CI=true` the test fails instead).
fn analyze() -> Option<Command> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require(
        found,
        "systemd-analyze is missing: install the `systemd` package (.ci/deps does)",
    )
    .then(|| Command::new("systemd-analyze"))
}

#[test]
fn unit_file_verifies_without_a_single_complaint() {
    let Some(mut cmd) = analyze() else { return };
    // verify checks that ExecStart= is executable: point it at the binary
    // just built instead of /usr/sbin.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(unit()).unwrap();
    let copy = dir.path().join("tap-broker.service");
    std::fs::write(
        &copy,
        text.replace("/usr/sbin/tap-broker", env!("CARGO_BIN_EXE_tap-broker")),
    )
    .unwrap();
    let out = cmd
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    // An unknown or misspelt key is only a warning ("ignoring"): any word
    // at all is a failure.
    assert!(err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn unit_file_security_exposure_stays_at_or_below_its_score() {
    let Some(mut cmd) = analyze() else { return };
    let out = cmd
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tap-broker.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure score (systemd-analyze security --offline needs systemd >= 250): \
                 {text}{err}"
            )
        });
    assert!(
        score <= MAX_EXPOSURE,
        "tap-broker.service exposure {score} > {MAX_EXPOSURE}:\n{text}"
    );
}

#[test]
fn unit_file_every_kept_capability_has_a_reason() {
    let text = std::fs::read_to_string(unit()).unwrap();
    let caps: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= is set")
        .split_whitespace()
        .collect();
    assert!(!caps.is_empty() && !caps[0].starts_with('~'), "{caps:?}");
    for cap in caps {
        assert!(
            text.lines()
                .filter(|l| l.starts_with('#'))
                .any(|l| l.split_whitespace().nth(1) == Some(cap)),
            "{cap} has no comment line saying why the broker needs it"
        );
    }
    for key in [
        "SystemCallArchitectures=native",
        "RestrictSUIDSGID=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(text.lines().any(|l| l == key), "{key} missing");
    }
    // Writable image roots may live under /home.
    assert!(
        !text
            .lines()
            .any(|l| l == "ProtectHome=yes" || l == "ProtectHome=read-only"),
        "ProtectHome would make image roots under /home unwritable"
    );
}

#[test]
fn unit_file_delegates_a_writable_cgroup_subtree() {
    let text = std::fs::read_to_string(unit()).unwrap();
    let has = |l: &str| text.lines().any(|x| x.trim() == l);
    assert!(has("Delegate=yes"), "workers' cgroups need Delegate=yes");
    assert!(
        !has("ProtectControlGroups=yes"),
        "a read-only /sys/fs/cgroup forbids the delegated subtree"
    );
}
