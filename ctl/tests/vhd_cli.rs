//! `tap-ctl vhd ...` end to end: the binary, its flags, its output and
//! its exit codes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tapctl(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = tapctl(args, None);
    assert!(
        o.status.success(),
        "tap-ctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn query(p: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["vhd", "query", "-n", s(p), "--json"])).unwrap()
}

#[test]
fn cli_create_write_read_query_check_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "16"]);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let o = tapctl(&["vhd", "write", "-n", s(&p), "-o", "12345"], Some(&data));
    assert!(o.status.success());
    let o = tapctl(
        &["vhd", "read", "-n", s(&p), "-o", "12345", "-l", "100000"],
        None,
    );
    assert_eq!(o.stdout, data);
    let q = query(&p);
    assert_eq!(q["virtual_size"], 16 << 20);
    assert_eq!(q["type"], "dynamic");
    assert_eq!(q["parent"], serde_json::Value::Null);
    assert_eq!(q["block_size"], 2 << 20);
    assert_eq!(q["allocated_blocks"], 1);
    assert_eq!(q["physical_size"], std::fs::metadata(&p).unwrap().len());
    assert_eq!(ok(&["vhd", "query", "-n", s(&p), "-v"]).trim(), "16");
    assert!(ok(&["vhd", "check", "-n", s(&p)]).contains("is valid"));
    let o = tapctl(
        &[
            "vhd",
            "read",
            "-n",
            s(&p),
            "-o",
            &(16u64 << 20).to_string(),
            "-l",
            "1",
        ],
        None,
    );
    assert!(!o.status.success());
}

#[test]
fn cli_snapshot_coalesce_resize_set_parent_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "8", "--fixed"]);
    assert_eq!(query(&base)["type"], "fixed");
    tapctl(
        &["vhd", "write", "-n", s(&base), "-o", "0"],
        Some(b"base data"),
    );
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    let q = query(&child);
    assert_eq!(q["type"], "differencing");
    assert_eq!(q["virtual_size"], 8 << 20);
    assert!(q["parent"].as_str().unwrap().ends_with("base.vhd"));
    tapctl(
        &["vhd", "write", "-n", s(&child), "-o", "5"],
        Some(b"CHILD"),
    );
    let o = tapctl(
        &["vhd", "read", "-n", s(&child), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");

    let moved = tmp.path().join("moved-base.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&child)], None);
    assert!(!o.status.success());
    ok(&["vhd", "set-parent", "-n", s(&child), "-p", s(&moved)]);
    ok(&["vhd", "check", "-n", s(&child)]);

    let out = ok(&["vhd", "coalesce", "-n", s(&child)]);
    assert!(out.contains("moved-base.vhd"), "{out}");
    let o = tapctl(
        &["vhd", "read", "-n", s(&moved), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");

    ok(&["vhd", "resize", "-n", s(&moved), "-s", "20"]);
    assert_eq!(query(&moved)["virtual_size"], 20 << 20);
    let o = tapctl(&["vhd", "resize", "-n", s(&moved), "-s", "10"], None);
    assert!(!o.status.success());

    let raw = tmp.path().join("x.raw");
    ok(&["vhd", "convert", "-O", "raw", s(&moved), s(&raw)]);
    let r = std::fs::read(&raw).unwrap();
    assert_eq!(r.len(), 20 << 20);
    assert_eq!(&r[..12], b"base CHILD\0\0");
    let back = tmp.path().join("back.vhd");
    ok(&["vhd", "convert", "-O", "vhd", s(&raw), s(&back)]);
    assert_eq!(query(&back)["type"], "dynamic");
    assert_eq!(query(&back)["allocated_blocks"], 1);
    let o = tapctl(
        &["vhd", "read", "-n", s(&back), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");
}

#[test]
fn cli_check_lists_problems_and_fails_on_a_damaged_image() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    // Point two BAT entries past the end of the file.
    let mut b = std::fs::read(&p).unwrap();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    b[1540..1544].copy_from_slice(&0x00ff_1000u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&p)], None);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().filter(|l| l.contains("bat:")).count(),
        2,
        "{out}"
    );
    let o = tapctl(&["vhd", "query", "-n", s(&p)], None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.vhd") && err.contains("tap-ctl vhd check"),
        "{err}"
    );
    let o = tapctl(
        &["vhd", "query", "-n", s(&tmp.path().join("nope.vhd"))],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}
