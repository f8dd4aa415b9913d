//! `tap-ctl vhd` with raw parents (`vhd-util snapshot -m`): snapshot -m,
//! query, check, read, write, convert, coalesce and set-parent -m, each
//! compared with qemu's view of the same disk: the raw parent with the
//! same writes applied by `qemu-io`, computed independently of tapjail.

mod common;
use common::{ok, s, tapctl};

use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn fails(args: &[&str]) -> String {
    let o = tapctl(args, None);
    assert_eq!(o.status.code(), Some(1), "tap-ctl {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qemu_io(args: &[&str]) {
    let o = Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io (qemu-utils) is needed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Writes as (offset, length, fill byte): unaligned, across the 2 MiB
/// block boundary, and the last sector.
const WRITES: [(u64, u64, u8); 3] = [
    (1000, 3000, 0xa1),
    (2 * MIB - 4096, 10_000, 0xb2),
    (8 * MIB - 512, 512, 0xc3),
];

/// A raw parent of 8 MiB (qemu-io fills it), a copy to which qemu-io
/// applies [`WRITES`] (qemu's view of parent + child), and a child made
/// with `snapshot -m` to which tap-ctl applies the same writes.
fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    qemu_io(&["-f", "raw", "-c", "write -P 0x5a 0 8M", s(&base)]);
    qemu_io(&["-f", "raw", "-c", "write -P 0x17 3M 1M", s(&base)]);
    let want = dir.join("qemu-view.raw");
    std::fs::copy(&base, &want).unwrap();
    for (off, len, fill) in WRITES {
        let cmd = format!("write -P {fill:#x} {off} {len}");
        qemu_io(&["-f", "raw", "-c", &cmd, s(&want)]);
    }
    let child = dir.join("child.vhd");
    ok(
        &["vhd", "snapshot", "-m", "-n", s(&child), "-p", s(&base)],
        None,
    );
    for (off, len, fill) in WRITES {
        let data = vec![fill; len as usize];
        ok(
            &["vhd", "write", "-n", s(&child), "-o", &off.to_string()],
            Some(&data),
        );
    }
    (base, child, want)
}

#[test]
fn raw_parent_snapshot_m_query_check_read_convert_match_qemus_view() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, child, want) = setup(tmp.path());
    let base_before = std::fs::read(&base).unwrap();
    let want = std::fs::read(&want).unwrap();

    let q: serde_json::Value =
        serde_json::from_slice(&ok(&["vhd", "query", "--json", "-n", s(&child)], None)).unwrap();
    assert_eq!(q["type"], "differencing");
    assert_eq!(q["virtual_size"], 8 * MIB, "as large as the raw file");
    assert_eq!(q["parent_raw"], true, "{q}");
    assert_eq!(q["parent_uuid"], "00000000-0000-0000-0000-000000000000");
    let p = ok(&["vhd", "query", "-p", "-n", s(&child)], None);
    let abs = std::path::absolute(&base).unwrap();
    assert_eq!(String::from_utf8(p).unwrap().trim(), s(&abs));
    let text = String::from_utf8(ok(&["vhd", "query", "-n", s(&child)], None)).unwrap();
    assert!(text.contains("parent type: raw"), "{text}");

    let c = String::from_utf8(ok(&["vhd", "check", "-n", s(&child)], None)).unwrap();
    assert!(c.contains("is valid"), "{c}");

    let read = ok(
        &[
            "vhd",
            "read",
            "-n",
            s(&child),
            "-o",
            "0",
            "-l",
            &(8 * MIB).to_string(),
        ],
        None,
    );
    assert!(read == want, "read differs from qemu's view");
    let out = tmp.path().join("converted.raw");
    ok(&["vhd", "convert", s(&child), s(&out)], None);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "convert differs from qemu's view"
    );
    // And through a VHD: qemu reads tapjail's dynamic conversion alike.
    let vhd = tmp.path().join("converted.vhd");
    ok(&["vhd", "convert", "-O", "vhd", s(&child), s(&vhd)], None);
    let back = tmp.path().join("back.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw", s(&vhd), s(&back)])
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&back).unwrap() == want);

    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the raw parent is untouched"
    );
}

#[test]
fn raw_parent_coalesce_makes_the_raw_file_qemus_view() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, child, want) = setup(tmp.path());
    let said = String::from_utf8(ok(&["vhd", "coalesce", "-n", s(&child)], None)).unwrap();
    assert!(said.contains("into") && said.contains("base.raw"), "{said}");
    assert!(
        std::fs::read(&base).unwrap() == std::fs::read(&want).unwrap(),
        "the raw parent now reads as parent + child"
    );
}

#[test]
fn raw_parent_snapshot_without_m_names_the_flag_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("disk.img");
    std::fs::write(&base, vec![1u8; MIB as usize]).unwrap();
    let child = tmp.path().join("c.vhd");
    let err = fails(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    assert!(err.contains("say -m (--raw-parent)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!child.exists());
}

#[test]
fn raw_parent_snapshot_m_refuses_a_vhd_a_missing_file_and_a_size_that_is_not_whole_sectors() {
    let tmp = tempfile::tempdir().unwrap();
    let vhd = tmp.path().join("base.vhd");
    ok(&["vhd", "create", "-n", s(&vhd), "-s", "4"], None);
    let child = tmp.path().join("c.vhd");
    let err = fails(&["vhd", "snapshot", "-m", "-n", s(&child), "-p", s(&vhd)]);
    assert!(
        err.contains("it is a VHD, not a raw image") && err.contains("drop -m"),
        "{err}"
    );
    assert!(!child.exists());
    let missing = tmp.path().join("missing.raw");
    let err = fails(&["vhd", "snapshot", "-m", "-n", s(&child), "-p", s(&missing)]);
    assert!(
        err.contains(&format!("{} does not exist", missing.display()))
            && !err.contains(&format!("{} does not exist", child.display())),
        "the parent is named, not the child: {err}"
    );
    let odd = tmp.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let err = fails(&["vhd", "snapshot", "-m", "-n", s(&child), "-p", s(&odd)]);
    assert!(
        err.contains("is 1000 bytes") && err.contains("512-byte sectors"),
        "{err}"
    );
    assert!(!child.exists());
}

#[test]
fn raw_parent_check_flags_a_short_missing_or_vhd_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, child, _) = setup(tmp.path());
    let f = std::fs::File::options().write(true).open(&base).unwrap();
    f.set_len(4 * MIB).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&child)], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out.contains("4194304 bytes, smaller than the child's virtual size of 8388608 bytes"),
        "{out}"
    );
    // Reading is refused too, rather than serving a short disk.
    let err = fails(&["vhd", "read", "-n", s(&child), "-o", "0", "-l", "512"]);
    assert!(
        err.contains("smaller than the child's virtual size"),
        "{err}"
    );

    // A VHD where the raw parent was.
    std::fs::remove_file(&base).unwrap();
    ok(&["vhd", "create", "-n", s(&base), "-s", "8"], None);
    let o = tapctl(&["vhd", "check", "-n", s(&child)], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("it is a VHD, not a raw image"), "{out}");

    std::fs::remove_file(&base).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&child)], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("raw parent"));
}

#[test]
fn raw_parent_set_parent_m_points_the_child_at_another_raw_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, child, want) = setup(tmp.path());
    // An identical copy elsewhere (the parent moved).
    std::fs::create_dir(tmp.path().join("kids")).unwrap();
    let moved = tmp.path().join("kids/child.vhd");
    std::fs::rename(&child, &moved).unwrap();
    let copy = tmp.path().join("kids/base-copy.raw");
    std::fs::copy(&base, &copy).unwrap();
    ok(
        &["vhd", "set-parent", "-m", "-n", s(&moved), "-p", s(&copy)],
        None,
    );
    let q: serde_json::Value =
        serde_json::from_slice(&ok(&["vhd", "query", "--json", "-n", s(&moved)], None)).unwrap();
    assert_eq!(q["parent_raw"], true, "{q}");
    let read = ok(
        &[
            "vhd",
            "read",
            "-n",
            s(&moved),
            "-o",
            "0",
            "-l",
            &(8 * MIB).to_string(),
        ],
        None,
    );
    assert!(read == std::fs::read(&want).unwrap());
    // A shorter file is refused, and so is a VHD given with -m.
    let short = tmp.path().join("kids/short.raw");
    std::fs::write(&short, vec![0u8; MIB as usize]).unwrap();
    let err = fails(&["vhd", "set-parent", "-m", "-n", s(&moved), "-p", s(&short)]);
    assert!(
        err.contains("smaller than the child's virtual size"),
        "{err}"
    );
}

#[test]
fn raw_parent_child_is_not_grown_past_its_raw_file_until_the_file_grows() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, child, want) = setup(tmp.path());
    let before = std::fs::read(&child).unwrap();
    // Growing the child past its 8 MiB raw parent would leave a chain
    // that cannot be opened: refused, naming the parent, nothing written.
    let err = fails(&["vhd", "resize", "-n", s(&child), "-s", "16"]);
    assert!(
        err.contains("raw parent") && err.contains("base.raw") && err.contains("grow"),
        "{err}"
    );
    assert_eq!(std::fs::read(&child).unwrap(), before, "child unchanged");
    let read_all = |len: u64| {
        let len = len.to_string();
        ok(
            &["vhd", "read", "-n", s(&child), "-o", "0", "-l", &len],
            None,
        )
    };
    assert_eq!(read_all(8 * MIB), std::fs::read(&want).unwrap());
    // Once the raw file is as large, the child grows and reads the same
    // data followed by zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    ok(&["vhd", "resize", "-n", s(&child), "-s", "16"], None);
    let mut expected = std::fs::read(&want).unwrap();
    expected.resize(16 * MIB as usize, 0);
    assert_eq!(read_all(16 * MIB), expected);
    ok(&["vhd", "check", "-n", s(&child)], None);
}
