//! `tap-ctl metrics` end to end: a real broker and FUSE + loop devices,
//! I/O through the kernel, the output read by a real Prometheus parser.
//! Needs root, /dev/fuse, loop devices and python3-prometheus-client.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tapjail_tests::*;
use tapjail_testsupport::prometheus::{have_parser, parse, Family};
use tapjail_testsupport::{fuse_loop_turn, require, Aligned};

const CHUNK: usize = 64 << 10;

fn create(h: &Harness, t: &TenantSpec, file: &str) -> (PathBuf, PathBuf) {
    let img = h.raw_image(t.name, file, 4 << 20);
    let spec = format!("aio:{}", img.display());
    let dev = PathBuf::from(h.ok(t, &["create", "-a", &spec]).trim());
    (img, dev)
}

fn metrics(h: &Harness, t: &TenantSpec) -> (String, Vec<Family>) {
    let text = h.ok(t, &["metrics"]);
    let fams = parse(&text).unwrap_or_else(|e| panic!("parser refused: {e}\n{text}"));
    (text, fams)
}

/// The value of `family`'s sample named `sample` with these labels.
fn value(fams: &[Family], family: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let f = fams
        .iter()
        .find(|f| f.name == family)
        .unwrap_or_else(|| panic!("no {family}"));
    f.samples
        .iter()
        .find(|s| s.name == sample && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .unwrap_or_else(|| panic!("no {sample}{labels:?} in {f:#?}"))
        .value
}

/// Every minor label in the output.
fn minors(fams: &[Family]) -> Vec<String> {
    let mut m: Vec<String> = fams
        .iter()
        .flat_map(|f| &f.samples)
        .filter_map(|s| s.label("minor").map(str::to_string))
        .collect();
    m.sort();
    m.dedup();
    m
}

fn direct_io(dev: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open the device O_DIRECT");
    let mut buf = Aligned::new(CHUNK);
    buf.buf().fill(0x5a);
    f.write_all_at(buf.buf(), 0).expect("write");
    f.sync_all().expect("fsync");
    f.read_exact_at(buf.buf(), 0).expect("read");
    assert!(buf.buf().iter().all(|b| *b == 0x5a));
}

#[test]
fn metrics_count_fuse_io_and_show_each_tenant_only_her_disks() {
    if !require(have_parser(), "python3-prometheus-client") {
        return;
    }
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE, BOB],
        ..Options::default()
    });
    // Quotes and a backslash in a tenant-chosen file name.
    let (a_img, a_dev) = create(&h, &ALICE, "a\"q\\b.img");
    let (b_img, _b_dev) = create(&h, &BOB, "b.img");
    let a_label = format!("aio:{}", a_img.display());

    let (_, before) = metrics(&h, &ALICE);
    let written = |fams: &[Family]| {
        value(
            fams,
            "tapjail_disk_bytes",
            "tapjail_disk_bytes_total",
            &[("image", &a_label), ("op", "write")],
        )
    };
    let w0 = written(&before);
    direct_io(&a_dev);
    let (text, after) = metrics(&h, &ALICE);
    assert!(written(&after) >= w0 + CHUNK as f64, "{text}");
    let read = value(
        &after,
        "tapjail_disk_bytes",
        "tapjail_disk_bytes_total",
        &[("image", &a_label), ("op", "read")],
    );
    assert!(read >= CHUNK as f64, "{text}");
    for op in ["read", "write"] {
        let count = value(
            &after,
            "tapjail_disk_request_duration_seconds",
            "tapjail_disk_request_duration_seconds_count",
            &[("image", &a_label), ("op", op)],
        );
        let inf = value(
            &after,
            "tapjail_disk_request_duration_seconds",
            "tapjail_disk_request_duration_seconds_bucket",
            &[("image", &a_label), ("op", op), ("le", "+Inf")],
        );
        assert!(count >= 1.0 && count == inf, "{op}: {text}");
    }
    let up = value(
        &after,
        "tapjail_disk_up",
        "tapjail_disk_up",
        &[
            ("image", &a_label),
            ("tenant", "alice"),
            ("frontend", "fuse"),
        ],
    );
    assert_eq!(up, 1.0);

    // Each tenant sees only her own disk; bob's output never names alice's.
    assert_eq!(minors(&after).len(), 1, "{text}");
    let (bob_text, bob) = metrics(&h, &BOB);
    assert_eq!(minors(&bob).len(), 1, "{bob_text}");
    assert!(
        !bob_text.contains("alice") && !bob_text.contains("a\\\"q"),
        "{bob_text}"
    );
    assert!(bob_text.contains(&*b_img.to_string_lossy()), "{bob_text}");

    // The admin sees both, written atomically to a file.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tapjail.prom");
    h.ok(&ROOT, &["metrics", "-o", out.to_str().unwrap()]);
    let text = std::fs::read_to_string(&out).unwrap();
    let all = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(minors(&all).len(), 2, "{text}");
    h.ok(&ALICE, &["destroy", "-m", &minors(&after)[0]]);
    h.ok(&BOB, &["destroy", "-m", &minors(&bob)[0]]);
}
