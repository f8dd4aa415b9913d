//! `check` flags every footer, header and batmap variant that opens but
//! serves a disk other than the one meant, and each message names the
//! tool that fixes it; `repair` and `check` agree on what is left.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tapctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = tapctl(args);
    assert!(
        o.status.success(),
        "tap-ctl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs `check`, which must fail; stdout and stderr.
fn check_fails(p: &Path) -> (String, String) {
    let o = tapctl(&["vhd", "check", "-n", p.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "check passed: {out}{err}");
    (out, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Change every footer of `p` (the copy at 0 only if it is one) with `f`,
/// then fix their checksums.
fn edit_footers(p: &Path, f: impl Fn(&mut [u8])) {
    let mut b = std::fs::read(p).unwrap();
    let n = b.len();
    let mut at = vec![n - 512];
    if &b[..8] == b"conectix" {
        at.push(0);
    }
    for o in at {
        let sector = &mut b[o..o + 512];
        f(sector);
        sector[64..68].fill(0);
        let sum = !sector
            .iter()
            .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        sector[64..68].copy_from_slice(&sum.to_be_bytes());
    }
    std::fs::write(p, &b).unwrap();
}

/// (kind, create flag, footer edit, text `check` must print).
type Case = (
    &'static str,
    &'static str,
    Box<dyn Fn(&mut [u8])>,
    &'static str,
);

fn set_size(sector: &mut [u8], size: u64) {
    sector[48..56].copy_from_slice(&size.to_be_bytes());
}

#[test]
fn check_flags_bad_sizes_and_versions_and_names_no_false_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Case> = vec![
        (
            "fixed",
            "--fixed",
            Box::new(|f| set_size(f, 0)),
            "0 bytes long",
        ),
        (
            "fixed",
            "--fixed",
            Box::new(|f| set_size(f, 511)),
            "0 bytes long",
        ),
        (
            "fixed",
            "--fixed",
            Box::new(|f| set_size(f, 511)),
            "511 bytes is not a whole",
        ),
        (
            "dynamic",
            "",
            Box::new(|f| set_size(f, (4 << 20) + 100)),
            "not a whole number",
        ),
        (
            "dynamic",
            "",
            Box::new(|f| f[12..16].copy_from_slice(&[0, 1, 0, 1])),
            "version 1.1",
        ),
        (
            "fixed",
            "--fixed",
            Box::new(|f| f[12..16].copy_from_slice(&[0, 2, 0, 0])),
            "version 2.0",
        ),
    ];
    for (i, (kind, flag, edit, want)) in cases.into_iter().enumerate() {
        let p = tmp.path().join(format!("{i}-{kind}.vhd"));
        let mut args = vec!["vhd", "create", "-n", s(&p), "-s", "4"];
        if !flag.is_empty() {
            args.push(flag);
        }
        ok(&args);
        edit_footers(&p, |f| edit(f));
        let (out, err) = check_fails(&p);
        assert!(out.contains(want), "case {i}: {out}");
        assert!(out.contains("footer."), "case {i}: {out}");
        assert!(
            !err.contains("repair -n"),
            "case {i}: repair cannot fix it: {err}"
        );
        assert!(out.contains("no tool fixes this"), "case {i}: {out}");
    }
}

#[test]
fn check_flags_a_differencing_image_relabelled_as_dynamic() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "4"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    edit_footers(&child, |f| f[60..64].copy_from_slice(&3u32.to_be_bytes()));
    let (out, _) = check_fails(&child);
    assert!(
        out.contains("footer.disk_type") && out.contains("relabelled"),
        "{out}"
    );
}

#[test]
fn check_flags_batmap_bits_of_unallocated_blocks_and_repair_clears_them() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    let mut b = std::fs::read(&p).unwrap();
    let hdr = (0..b.len() / 512)
        .map(|i| i * 512)
        .find(|&o| &b[o..o + 8] == b"tdbatmap")
        .unwrap();
    let map = u64::from_be_bytes(b[hdr + 8..hdr + 16].try_into().unwrap()) as usize;
    b[map] |= 0x40; // block 1, never written
    let sum = !b[map..map + 512]
        .iter()
        .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    b[hdr + 24..hdr + 28].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let (out, err) = check_fails(&p);
    assert!(
        out.contains("unallocated block(s) (first: block 1)"),
        "{out}"
    );
    assert!(out.contains("`tap-ctl vhd repair` fixes this"), "{out}");
    assert!(err.contains("repair -n"), "{err}");
    let r = ok(&["vhd", "repair", "-n", s(&p)]);
    assert!(r.contains("cleared 1 batmap bit"), "{r}");
    ok(&["vhd", "check", "-n", s(&p)]);
}

#[test]
fn repair_and_check_agree_on_a_missing_parent_and_name_set_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "4"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    std::fs::rename(&base, tmp.path().join("elsewhere.vhd")).unwrap();
    let (out, err) = check_fails(&child);
    assert!(out.contains("set-parent"), "{out}");
    assert!(
        err.contains("set-parent") && !err.contains("repair -n"),
        "{err}"
    );
    let before = std::fs::read(&child).unwrap();
    let o = tapctl(&["vhd", "repair", "-n", s(&child)]);
    let rout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "repair must fail as check does: {rout}"
    );
    assert!(
        rout.contains("repair cannot fix") && rout.contains("set-parent"),
        "{rout}"
    );
    assert_eq!(std::fs::read(&child).unwrap(), before);
}

#[test]
fn bat_messages_use_one_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("u.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    let mut b = std::fs::read(&p).unwrap();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes()); // past the end
    b[1540..1544].copy_from_slice(&1u32.to_be_bytes()); // over the header
    std::fs::write(&p, &b).unwrap();
    let (out, _) = check_fails(&p);
    let bat: Vec<&str> = out.lines().filter(|l| l.contains(" bat: ")).collect();
    assert_eq!(bat.len(), 2, "{out}");
    for l in bat {
        assert!(l.contains("bytes") && !l.contains("sector"), "{l}");
    }
}
