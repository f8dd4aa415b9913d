//! `tap-ctl vhd resize` keeps blktap's layout (metadata first, blocks
//! after it), so `vhd-util check` accepts the result; qemu reads resized
//! images as it read them before; and the layout the old resize wrote (BAT
//! after the data, "block 0 clobbers headers") is flagged and repaired.

mod common;
use common::{s, tapctl};

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;
use tapjail_image::vhd::bat;
use tapjail_image::vhd::footer::CREATOR_VERSION_OPTIONAL_BATMAP;
use tapjail_image::vhd::layout::Metadata;

fn ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    String::from_utf8_lossy(&common::ok(args, stdin)).into_owned()
}

fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}; install qemu-utils"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// The image's own data as qemu reads it (qemu's vpc driver shows no
/// parent, so for a child this is the child's sectors only).
fn qemu_raw(p: &Path) -> Vec<u8> {
    let raw = p.with_extension("qemu.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", s(p), s(&raw)],
    );
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

/// Where every test image keeps its data (reading all 300 MiB at each
/// step would only measure memcpy).
const PREFIX: usize = 12 << 20;

/// The disk's size and first [`PREFIX`] bytes as tapjail reads them.
fn tap_prefix(p: &Path) -> (u64, Vec<u8>) {
    let q: serde_json::Value =
        serde_json::from_str(&ok(&["vhd", "query", "-n", s(p), "--json"], None)).unwrap();
    let size = q["virtual_size"].as_u64().unwrap();
    let len = (size as usize).min(PREFIX).to_string();
    let o = tapctl(&["vhd", "read", "-n", s(p), "-o", "0", "-l", &len], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (size, o.stdout)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    tapjail_testsupport::pattern(len, seed)
}

/// `a` followed by zeros up to `len` bytes.
fn grown(a: &[u8], len: usize) -> Vec<u8> {
    let mut v = a.to_vec();
    v.resize(len, 0);
    v
}

/// Resize `p` to `mib` MiB and prove: `check` is clean (no block before
/// the metadata), qemu reads what it read before plus zeros, tapjail
/// reads what it read before plus zeros.
fn resize_and_compare(p: &Path, mib: u64) {
    let before = p.with_extension("before");
    std::fs::copy(p, &before).unwrap();
    let (_, t0) = tap_prefix(p);
    ok(&["vhd", "resize", "-n", s(p), "-s", &mib.to_string()], None);
    ok(&["vhd", "check", "-n", s(p)], None);
    // Identical data, and only zeros past the old end.
    run(
        "qemu-img",
        &["compare", "-q", "-f", "vpc", "-F", "vpc", s(&before), s(p)],
    );
    let info: serde_json::Value = serde_json::from_slice(&run(
        "qemu-img",
        &["info", "--output=json", "-f", "vpc", s(p)],
    ))
    .unwrap();
    assert_eq!(info["virtual-size"], mib << 20);
    std::fs::remove_file(&before).unwrap();
    let (got_size, t1) = tap_prefix(p);
    assert_eq!(got_size, mib << 20);
    assert!(t1 == grown(&t0, t1.len()), "{}: tapjail", p.display());
}

#[test]
fn resize_of_written_images_to_12_and_300_mib_keeps_metadata_first_and_qemu_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    for mib in [12, 300] {
        let p = tmp.path().join(format!("tap{mib}.vhd"));
        ok(&["vhd", "create", "-n", s(&p), "-s", "10"], None);
        ok(
            &["vhd", "write", "-n", s(&p), "-o", "0"],
            Some(&pattern(4096, mib)),
        );
        resize_and_compare(&p, mib);
        assert_eq!(tap_prefix(&p).1[..4096], pattern(4096, mib)[..]);

        // qemu puts block 0 right after its BAT: it has to move.
        let q = tmp.path().join(format!("qemu{mib}.vhd"));
        run("qemu-img", &["create", "-q", "-f", "vpc", s(&q), "10M"]);
        run("qemu-io", &["-f", "vpc", "-c", "write -P 0x5a 0 4k", s(&q)]);
        resize_and_compare(&q, mib);
        assert!(tap_prefix(&q).1[..4096].iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn resize_of_a_differencing_child_and_of_every_level_of_a_chain_reads_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let mid = tmp.path().join("mid.vhd");
    let leaf = tmp.path().join("leaf.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "10"], None);
    ok(
        &["vhd", "write", "-n", s(&base), "-o", "0"],
        Some(&pattern(3 << 20, 1)),
    );
    ok(&["vhd", "snapshot", "-n", s(&mid), "-p", s(&base)], None);
    ok(
        &["vhd", "write", "-n", s(&mid), "-o", "4096"],
        Some(&pattern(4096, 2)),
    );
    ok(&["vhd", "snapshot", "-n", s(&leaf), "-p", s(&mid)], None);
    ok(
        &["vhd", "write", "-n", s(&leaf), "-o", "9000"],
        Some(&pattern(5000, 3)),
    );
    // A child grows past its parents; then each level grows in turn.
    resize_and_compare(&leaf, 300);
    resize_and_compare(&mid, 12);
    resize_and_compare(&base, 300);
    ok(&["vhd", "check", "-n", s(&leaf)], None);
    let mut want = pattern(3 << 20, 1);
    want[4096..8192].copy_from_slice(&pattern(4096, 2));
    want[9000..14000].copy_from_slice(&pattern(5000, 3));
    assert_eq!(tap_prefix(&leaf), (300 << 20, grown(&want, PREFIX)));
}

/// What the old `resize` wrote: the grown BAT after the last block, the
/// header switched to it, and block 0 left before it.
fn old_layout(p: &Path, new_size: u64) {
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let meta = Metadata::read(&f).unwrap();
    let sp = meta.sparse.as_ref().unwrap();
    let needed = new_size.div_ceil(u64::from(sp.block_size)) as u32;
    let mut entries = sp.bat.clone();
    entries.resize(needed as usize, bat::UNUSED);
    let table = bat::encode(&entries, needed);
    let at = sp.data_end;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&table, at).unwrap();
    let mut header = sp.header.clone();
    header.set_table(at, needed);
    f.write_all_at(&header.to_bytes(), 512).unwrap();
    let mut footer = meta.footer.clone();
    footer.set_current_size(new_size);
    footer.set_creator_version(CREATOR_VERSION_OPTIONAL_BATMAP);
    let end = at + table.len() as u64;
    f.write_all_at(&footer.to_bytes(), 0).unwrap();
    f.write_all_at(&footer.to_bytes(), end).unwrap();
    f.set_len(end + 512).unwrap();
}

#[test]
fn check_flags_a_block_before_a_moved_bat_as_clobbering_metadata_and_repair_moves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("old.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "10"], None);
    ok(
        &["vhd", "write", "-n", s(&p), "-o", "0"],
        Some(&pattern(4096, 7)),
    );
    old_layout(&p, 300 << 20);
    let (q0, (size, t0)) = (qemu_raw(&p), tap_prefix(&p));
    assert_eq!(size, 300 << 20);
    assert_eq!(t0[..4096], pattern(4096, 7)[..]);

    let o = tapctl(&["vhd", "check", "-n", s(&p)], None);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("block 0 clobbers metadata"), "{out}");
    assert!(out.contains("tap-ctl vhd repair"), "{out}");

    let out = ok(&["vhd", "repair", "-n", s(&p)], None);
    assert!(out.contains("moved 1 block"), "{out}");
    ok(&["vhd", "check", "-n", s(&p)], None);
    assert!(qemu_raw(&p) == q0);
    assert!(tap_prefix(&p) == (size, t0));
    // The moved block's data starts 4 KiB-aligned.
    let f = std::fs::File::open(&p).unwrap();
    let meta = Metadata::read(&f).unwrap();
    let sp = meta.sparse.unwrap();
    let start = u64::from(sp.bat[0]) * 512;
    assert!(start >= sp.metadata_end);
    assert_eq!((start + u64::from(sp.bitmap_bytes)) % 4096, 0);
}
