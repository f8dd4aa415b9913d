//! Messages about a damaged image give offsets and sizes in one unit:
//! bytes, in decimal, or sectors compared with sectors; never a sector
//! count against a byte limit, nor a hex offset next to a decimal size.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use tapjail_image::vhd::footer::Footer;
use tapjail_image::vhd::header::{Header, HEADER_SIZE};

fn tapctl(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 4 MiB dynamic image whose header `edit` changes (checksum fixed up).
fn with_header(dir: &Path, name: &str, edit: impl FnOnce(&mut Header)) -> std::path::PathBuf {
    let p = dir.join(name);
    assert!(tapctl(&["vhd", "create", "-n", s(&p), "-s", "4"]).0);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut b = [0u8; HEADER_SIZE];
    f.read_exact_at(&mut b, 512).unwrap();
    let mut h = Header::parse(&b).unwrap();
    edit(&mut h);
    f.write_all_at(&h.to_bytes(), 512).unwrap();
    p
}

fn one_unit(msg: &str) {
    assert!(!msg.contains("0x"), "hex offset: {msg}");
    for line in msg.lines() {
        assert!(
            !(line.contains("sectors") && line.contains(" bytes")) || line.contains("512-byte"),
            "sectors and bytes in one message: {line}"
        );
    }
}

#[test]
fn bat_offset_messages_are_in_decimal_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with_header(tmp.path(), "bat.vhd", |h| {
        let n = h.max_table_entries();
        h.set_table(1537, n);
    });
    let (ok, out) = tapctl(&["vhd", "check", "-n", s(&p)]);
    assert!(!ok);
    assert!(
        out.contains("BAT at byte 1537 is not a sector-aligned offset"),
        "{out}"
    );
    assert!(out.contains("-byte file"), "{out}");
    one_unit(&out);

    let p = with_header(tmp.path(), "past.vhd", |h| h.set_table(1 << 30, 2));
    let (ok, out) = tapctl(&["vhd", "check", "-n", s(&p)]);
    assert!(!ok);
    assert!(out.contains(&format!("byte {}", 1u64 << 30)), "{out}");
    one_unit(&out);
}

#[test]
fn a_size_past_the_maximum_compares_sectors_with_sectors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("huge.vhd");
    assert!(tapctl(&["vhd", "create", "-n", s(&p), "-s", "4"]).0);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, len - 512).unwrap();
    let mut footer = Footer::parse(&b).unwrap();
    footer.set_current_size(1 << 50);
    f.write_all_at(&footer.to_bytes(), len - 512).unwrap();
    f.write_all_at(&footer.to_bytes(), 0).unwrap();
    let (ok, out) = tapctl(&["vhd", "query", "-n", s(&p)]);
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "{} sectors is more than the maximum of {} sectors",
            (1u64 << 50) / 512,
            0xff00_0000u64
        )),
        "{out}"
    );
    one_unit(&out);
}
