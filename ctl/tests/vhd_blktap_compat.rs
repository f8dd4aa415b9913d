//! Files exactly as blktap writes them: fields of blktap's that tapjail
//! does not use survive tapjail's rewrites, and what tapjail cannot honour
//! (an encrypted image) is refused rather than damaged.

mod common;
use common::{ok, s, tapctl};

use std::process::{Command, Stdio};

/// Offsets of every batmap header ("tdbatmap" at a sector start).
fn batmap_headers(b: &[u8]) -> Vec<usize> {
    (0..b.len() / 512)
        .map(|i| i * 512)
        .filter(|&o| &b[o..o + 8] == b"tdbatmap")
        .collect()
}

/// blktap's bytes after tapjail's 28: marker, keyhash (cookie, nonce,
/// hash) and reserved, filled with a pattern; `keyhash` sets its cookie.
fn blktap_tail(keyhash: bool) -> Vec<u8> {
    let mut t: Vec<u8> = (0..484u32).map(|i| (i * 7 + 3) as u8).collect();
    t[0] = 1; // marker
    t[1] = u8::from(keyhash);
    t
}

#[test]
fn batmap_marker_keyhash_and_reserved_bytes_survive_writes_and_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "4"], None);
    let mut b = std::fs::read(&p).unwrap();
    let hdr = batmap_headers(&b)[0];
    let tail = blktap_tail(false);
    b[hdr + 28..hdr + 512].copy_from_slice(&tail);
    std::fs::write(&p, &b).unwrap();
    let sum_before = b[hdr + 24..hdr + 28].to_vec();

    // A full-block write sets the block's batmap bit: the header is
    // rewritten with a new checksum, and blktap's bytes stay.
    ok(
        &["vhd", "write", "-n", s(&p), "-o", "0"],
        Some(&vec![0x5a; 2 << 20]),
    );
    let b = std::fs::read(&p).unwrap();
    assert_ne!(
        b[hdr + 24..hdr + 28],
        sum_before[..],
        "batmap was not rewritten"
    );
    assert_eq!(&b[hdr + 28..hdr + 512], &tail[..]);
    ok(&["vhd", "check", "-n", s(&p)], None);

    // Growing past the table moves the batmap: the new header keeps them.
    ok(&["vhd", "resize", "-n", s(&p), "-s", "300"], None);
    let b = std::fs::read(&p).unwrap();
    let headers = batmap_headers(&b);
    let last = *headers.last().unwrap();
    assert_eq!(
        &b[last + 28..last + 512],
        &tail[..],
        "headers at {headers:?}"
    );
    ok(&["vhd", "check", "-n", s(&p)], None);
}

#[test]
fn image_whose_keyhash_says_encrypted_is_refused_for_writing_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("enc.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "4"], None);
    ok(
        &["vhd", "write", "-n", s(&p), "-o", "0"],
        Some(b"CIPHERTEXT"),
    );
    let mut b = std::fs::read(&p).unwrap();
    let hdr = batmap_headers(&b)[0];
    b[hdr + 28..hdr + 512].copy_from_slice(&blktap_tail(true));
    std::fs::write(&p, &b).unwrap();

    for (off, data) in [("0", &b"plain"[..]), ("1048576", &vec![1u8; 2 << 20][..])] {
        let o = tapctl(&["vhd", "write", "-n", s(&p), "-o", off], Some(data));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("enc.vhd") && err.contains("encrypted") && err.contains("keyhash"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b,
            "a refused write changed the file"
        );
    }
    // Reading is not writing: the bytes (ciphertext to blktap) are served.
    assert_eq!(
        ok(&["vhd", "read", "-n", s(&p), "-o", "0", "-l", "10"], None),
        b"CIPHERTEXT"
    );
    // Nor may a child of it take plaintext.
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&p)], None);
    let before = std::fs::read(&child).unwrap();
    let o = tapctl(
        &["vhd", "write", "-n", s(&child), "-o", "0"],
        Some(b"plain"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("encrypted"), "{err}");
    assert_eq!(std::fs::read(&child).unwrap(), before);
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

/// Whether tap-ctl's stderr (JSON lines: not a terminal) holds the
/// warning about block size `bs`, with its `block_size` field.
fn block_size_warned(stderr: &[u8], bs: &str) -> bool {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .any(|e| {
            e["level"] == "WARN"
                && e["block_size"].as_u64() == bs.parse().ok()
                && e["message"].as_str().is_some_and(|m| m.contains("blktap"))
        })
}

#[test]
fn block_size_other_than_2mib_is_warned_at_create_and_shown_by_query() {
    let tmp = tempfile::tempdir().unwrap();
    for (bs, warned) in [("524288", true), ("4194304", true), ("2097152", false)] {
        let p = tmp.path().join(format!("b{bs}.vhd"));
        let o = tapctl(
            &["vhd", "create", "-n", s(&p), "-s", "8", "--block-size", bs],
            None,
        );
        assert!(o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(block_size_warned(&o.stderr, bs), warned, "{bs}: {err}");
        let q = String::from_utf8(ok(&["vhd", "query", "-n", s(&p)], None)).unwrap();
        assert_eq!(q.contains("blktap cannot use"), warned, "{q}");
        let j: serde_json::Value =
            serde_json::from_slice(&ok(&["vhd", "query", "-n", s(&p), "--json"], None)).unwrap();
        assert_eq!(j["blktap_compatible_block_size"], !warned);
        let c = tmp.path().join(format!("c{bs}.vhd"));
        let o = tapctl(
            &[
                "vhd",
                "snapshot",
                "-n",
                s(&c),
                "-p",
                s(&p),
                "--block-size",
                bs,
            ],
            None,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(block_size_warned(&o.stderr, bs), warned);
        let raw = tmp.path().join(format!("r{bs}.raw"));
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let v = tmp.path().join(format!("v{bs}.vhd"));
        let o = tapctl(
            &[
                "vhd",
                "convert",
                "-O",
                "vhd",
                "--block-size",
                bs,
                s(&raw),
                s(&v),
            ],
            None,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(block_size_warned(&o.stderr, bs), warned);
    }
}

#[test]
fn query_p_prints_the_resolved_absolute_parent_and_json_keeps_both() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    std::fs::create_dir_all(root.join("kids")).unwrap();
    std::fs::create_dir_all(root.join("base")).unwrap();
    let in_root = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    in_root(&["vhd", "create", "-n", "base/b.vhd", "-s", "4"]);
    in_root(&["vhd", "snapshot", "-n", "kids/c.vhd", "-p", "base/b.vhd"]);
    let want = format!("{}\n", root.join("base/b.vhd").display());
    // Found through --parent-path, and only recorded (outside kids/).
    assert_eq!(
        in_root(&[
            "vhd",
            "query",
            "-n",
            "kids/c.vhd",
            "-p",
            "--parent-path",
            "kids/../base/b.vhd"
        ]),
        want
    );
    assert_eq!(in_root(&["vhd", "query", "-n", "kids/c.vhd", "-p"]), want);
    let j: serde_json::Value = serde_json::from_str(&in_root(&[
        "vhd",
        "query",
        "-n",
        "kids/c.vhd",
        "--json",
        "--parent-path",
        "kids/../base/b.vhd",
    ]))
    .unwrap();
    assert_eq!(j["parent"], "kids/../base/b.vhd");
    assert_eq!(j["parent_resolved"], want.trim_end());
}
