//! `--json` and progress bars of the offline commands: each JSON document
//! parses and carries what the plain output says; a bar is drawn on a
//! terminal only, reaches 100%, and `--quiet` hides it.

mod common;

use common::{ok, s, tapctl};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tapjail_testsupport::pty::run_on_pty;

fn json(args: &[&str]) -> Value {
    let out = tapctl(args, None);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text:?}"))
}

fn text(args: &[&str]) -> String {
    String::from_utf8(ok(args, None)).unwrap()
}

/// A dynamic VHD of `mib` MiB with its first `written` MiB written.
fn vhd(dir: &Path, name: &str, mib: u64, written: usize) -> PathBuf {
    let p = dir.join(name);
    ok(
        &["vhd", "create", "-n", s(&p), "-s", &mib.to_string()],
        None,
    );
    if written > 0 {
        ok(
            &["vhd", "write", "-n", s(&p), "-o", "0"],
            Some(&vec![0x5a; written << 20]),
        );
    }
    p
}

#[test]
fn json_query_carries_the_plain_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = vhd(dir.path(), "a.vhd", 8, 3);
    let v = json(&["vhd", "query", "-n", s(&p), "--json"]);
    let plain = text(&["vhd", "query", "-n", s(&p)]);
    assert_eq!(v["file"], s(&p));
    assert_eq!(v["virtual_size"], 8 << 20);
    assert!(plain.contains(&format!("virtual size: {} bytes", 8 << 20)));
    assert!(plain.contains(&format!("uuid: {}", v["uuid"].as_str().unwrap())));
    assert!(plain.contains(&format!(
        "allocated blocks: {}",
        v["allocated_blocks"].as_u64().unwrap()
    )));
    assert_eq!(v["allocated_blocks"], 2, "{v}");
    assert!(plain.contains(&format!(
        "physical size: {} bytes",
        v["physical_size"].as_u64().unwrap()
    )));
    assert_eq!(v["type"], "dynamic");
    assert!(v["parent"].is_null());
    // -v selects one value in plain output; JSON always has every key.
    assert_eq!(text(&["vhd", "query", "-n", s(&p), "-v"]).trim(), "8");
    assert_eq!(
        json(&["vhd", "query", "-n", s(&p), "-v", "--json"])["virtual_size"],
        8 << 20
    );
}

#[test]
fn json_check_and_repair_list_the_problems_plain_output_lists() {
    let dir = tempfile::tempdir().unwrap();
    let p = vhd(dir.path(), "a.vhd", 8, 1);
    let v = json(&["vhd", "check", "-n", s(&p), "--json"]);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["problems"], serde_json::json!([]));
    // Break the footer copy at offset 0 (its checksum no longer adds up).
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[70] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let out = tapctl(&["vhd", "check", "-n", s(&p)], None);
    assert_eq!(out.status.code(), Some(1));
    let plain = String::from_utf8_lossy(&out.stdout);
    let out = tapctl(&["vhd", "check", "-n", s(&p), "--json"], None);
    assert_eq!(out.status.code(), Some(1), "check --json still fails");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let problems = v["problems"].as_array().unwrap();
    assert!(!problems.is_empty());
    assert_eq!(problems.len(), plain.lines().count(), "{plain}\n{v}");
    for (p, line) in problems.iter().zip(plain.lines()) {
        assert!(
            line.contains(p["message"].as_str().unwrap()),
            "{line} / {p}"
        );
        assert!(line.contains(p["hint"].as_str().unwrap()), "{line} / {p}");
    }
    assert_eq!(problems[0]["fix"], "repair", "{v}");

    let out = tapctl(&["vhd", "repair", "-n", s(&p), "--json"], None);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{r}");
    assert_eq!(r["ok"], true);
    assert!(!r["actions"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["remaining"], serde_json::json!([]));
    assert_eq!(
        json(&["vhd", "check", "-n", s(&p), "--json"])["valid"],
        true
    );
}

#[test]
fn json_coalesce_says_where_the_bytes_went() {
    let dir = tempfile::tempdir().unwrap();
    let base = vhd(dir.path(), "base.vhd", 8, 0);
    let child = dir.path().join("child.vhd");
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)], None);
    ok(
        &["vhd", "write", "-n", s(&child), "-o", "0"],
        Some(&[7u8; 4096]),
    );
    let v = json(&["vhd", "coalesce", "-n", s(&child), "--json"]);
    assert_eq!(v["file"], s(&child));
    assert!(v["parent"].as_str().unwrap().ends_with("base.vhd"), "{v}");
    let merged = v["bytes_merged"].as_u64().unwrap();
    assert!(merged >= 4096, "{v}");
    let back = ok(
        &["vhd", "read", "-n", s(&base), "-o", "0", "-l", "4096"],
        None,
    );
    assert_eq!(back, vec![7u8; 4096]);
}

#[test]
fn json_policy_check_and_audit_verify_parse() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(&pol, "[[tenant]]\nname = \"a\"\nuids = [1]\nbogus = 1\n").unwrap();
    let out = tapctl(&["policy", "check", s(&pol), "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(4), Some(1)),
        "{v}"
    );

    let log = dir.path().join("a.jsonl");
    std::fs::write(&log, "").unwrap();
    let v = json(&["audit", "verify", s(&log), "--json"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["files"][0]["lines"], 0);
    assert!(v["broken"].is_null());
    std::fs::write(&log, "{\"prev\":\"00\"}\n").unwrap();
    let out = tapctl(&["audit", "verify", s(&log), "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["broken"]["line"], 1, "{v}");
    assert_eq!(v["broken"]["file"], s(&log));
}

fn on_pty(args: &[&str]) -> String {
    let (status, out) = run_on_pty(Command::new(env!("CARGO_BIN_EXE_tap-ctl")).args(args));
    assert!(status.success(), "tap-ctl {args:?} on a pty: {out}");
    out
}

#[test]
fn progress_bar_reaches_100_percent_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = vhd(dir.path(), "src.vhd", 16, 6);
    let raw = dir.path().join("out.raw");
    let out = on_pty(&["vhd", "convert", s(&src), s(&raw)]);
    // Starts at 0% of the image, ends at all of it.
    assert!(out.contains("convert ["), "{out:?}");
    assert!(out.contains("  0% 0 B/"), "{out:?}");
    assert!(out.contains("100% 16.00 MiB/16.00 MiB"), "{out:?}");
    // check and repair go through the 3 allocated 2 MiB blocks.
    for (verb, args, total) in [
        ("check", vec!["vhd", "check", "-n", s(&src)], "6.00 MiB"),
        // repair's closing check (its repairs here rewrite metadata only).
        (
            "repair, verifying",
            vec!["vhd", "repair", "-n", s(&src)],
            "6.00 MiB",
        ),
        (
            "resize",
            vec!["vhd", "resize", "-n", s(&src), "-s", "32"],
            "32.00 MiB",
        ),
    ] {
        let out = on_pty(&args);
        assert!(out.contains(&format!("{verb} [")), "{verb}: {out:?}");
        assert!(
            out.contains(&format!("100% {total}/{total}")),
            "{verb}: {out:?}"
        );
    }
    let base = vhd(dir.path(), "base.vhd", 16, 0);
    let child = dir.path().join("child.vhd");
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)], None);
    ok(
        &["vhd", "write", "-n", s(&child), "-o", "0"],
        Some(&vec![1u8; 4 << 20]),
    );
    let out = on_pty(&["vhd", "coalesce", "-n", s(&child)]);
    assert!(out.contains("coalesce ["), "{out:?}");
    // Coalesce walks the whole virtual disk.
    assert!(out.contains("100% 16.00 MiB/16.00 MiB"), "{out:?}");
    assert!(out.contains("merged"), "{out:?}");
}

#[test]
fn progress_bar_is_not_drawn_with_quiet_or_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = vhd(dir.path(), "src.vhd", 16, 6);
    let out = on_pty(&[
        "vhd",
        "-q",
        "convert",
        s(&src),
        s(&dir.path().join("a.raw")),
    ]);
    assert_eq!(out, "", "--quiet on a terminal draws nothing");
    let out = on_pty(&["vhd", "check", "--quiet", "-n", s(&src)]);
    assert_eq!(out.trim(), format!("{} is valid", src.display()));
    // Captured stdout and stderr (no terminal): nothing but the result.
    let o = tapctl(
        &["vhd", "convert", s(&src), s(&dir.path().join("b.raw"))],
        None,
    );
    assert!(o.status.success());
    assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{o:?}");
    let o = tapctl(&["vhd", "check", "-n", s(&src)], None);
    assert!(o.stderr.is_empty(), "{o:?}");
    // stderr a terminal but stdout captured (piped into a file or tool):
    // no bar either.
    let (m, slave) = tapjail_testsupport::pty::openpty();
    let o = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(["vhd", "convert", s(&src), s(&dir.path().join("c.raw"))])
        .stderr(std::process::Stdio::from(slave))
        .output()
        .unwrap();
    assert!(o.status.success());
    drop(o);
    let mut drawn = Vec::new();
    // The child is gone: the master holds whatever it drew.
    tapjail_testsupport::pty::drain(m, &mut drawn);
    assert!(drawn.is_empty(), "{:?}", String::from_utf8_lossy(&drawn));
}
