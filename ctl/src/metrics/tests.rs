use super::*;
use tapjail_common::proto::{FrontendKind, ImageKind, ImageSpec};
use tapjail_common::state::State;
use tapjail_common::stats::{FrontendStats, Histogram, ImageStats, WorkerStats, LATENCY_BUCKETS};
use tapjail_common::Minor;
use tapjail_testsupport::prometheus::{have_parser, parse, Family};

/// A path a tenant could name her image: quotes, backslashes, a newline
/// and a forged series after it.
const HOSTILE: &str = "/srv/a\"b\\c\nforged{minor=\"9\"} 1\n# TYPE x counter\n\\n.img";

fn disk(minor: u16, path: &str, tenant: &str, stats: bool) -> DiskMetrics {
    let minor = Minor::new(minor.into()).unwrap();
    let mut counts = vec![0; LATENCY_BUCKETS];
    counts[3] = 2;
    counts[LATENCY_BUCKETS - 1] = 1;
    let hist = Histogram {
        counts,
        sum_us: 20_000_150,
    };
    let worker = WorkerStats {
        name: format!("aio:{path}"),
        secs: [16, 8],
        images: vec![ImageStats {
            name: path.to_string(),
            hits: [16, 8],
            fail: [0, 1],
            ..Default::default()
        }],
        reqs_outstanding: 1,
        frontend: FrontendStats {
            kind: "fuse".into(),
            reqs: [5, 4],
            errors: 1,
            kicks: [3, 2],
        },
        histograms: tapjail_common::stats::Histograms {
            read: hist.clone(),
            write: hist,
            ..Default::default()
        },
        ..Default::default()
    };
    DiskMetrics {
        row: ListEntry {
            pid: Some(42),
            minor: Some(minor),
            state: Some(State(0)),
            image: Some(ImageSpec {
                kind: ImageKind::Aio,
                path: path.to_string(),
            }),
            read_only: false,
            frontend: Some(FrontendKind::Fuse),
            device: None,
            restarts: 2,
            mirror: None,
        },
        stats: stats.then(|| StatsReply {
            minor,
            pid: 42,
            frontend: Some(FrontendKind::Fuse),
            restarts: 2,
            worker,
            tenant: tenant.into(),
            cgroup: None,
            throttle: Some(tapjail_common::qos::ThrottleStats {
                delayed: [0, 3],
                delay_us: [0, 1_500_000],
                ..Default::default()
            }),
        }),
    }
}

fn parsed(disks: &[DiskMetrics]) -> Option<Vec<Family>> {
    if !tapjail_testsupport::require(have_parser(), "python3-prometheus-client") {
        return None;
    }
    let text = render(disks);
    Some(parse(&text).unwrap_or_else(|e| panic!("parser refused:\n{e}\n{text}")))
}

fn family<'a>(fams: &'a [Family], name: &str) -> &'a Family {
    fams.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name} in {fams:#?}"))
}

#[test]
fn every_family_has_type_help_and_prometheus_names() {
    let Some(fams) = parsed(&[disk(3, "/srv/a.img", "alice", true)]) else {
        return;
    };
    let expected = [
        ("tapjail_disk_up", "gauge"),
        ("tapjail_disk_state", "gauge"),
        ("tapjail_disk_restarts", "counter"),
        ("tapjail_disk_requests_received", "counter"),
        ("tapjail_disk_requests_completed", "counter"),
        ("tapjail_disk_request_errors", "counter"),
        ("tapjail_disk_kicks", "counter"),
        ("tapjail_disk_requests_outstanding", "gauge"),
        ("tapjail_disk_bytes", "counter"),
        ("tapjail_layer_bytes", "counter"),
        ("tapjail_layer_errors", "counter"),
        ("tapjail_disk_request_duration_seconds", "histogram"),
        ("tapjail_disk_throttle_delayed_requests", "counter"),
        ("tapjail_disk_throttle_delay_seconds", "counter"),
    ];
    let names: Vec<&str> = fams.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, expected.map(|e| e.0), "{fams:#?}");
    for (f, (_, kind)) in fams.iter().zip(expected) {
        assert_eq!(f.kind, kind, "{}", f.name);
        assert!(!f.help.is_empty(), "{} has no help", f.name);
        assert!(!f.samples.is_empty(), "{} has no samples", f.name);
        for s in &f.samples {
            if kind == "counter" {
                assert!(s.name.ends_with("_total"), "{}", s.name);
            }
            for key in ["minor", "tenant", "frontend", "image"] {
                assert!(s.label(key).is_some(), "{} lacks {key}", s.name);
            }
            assert!(s.value.is_finite() && s.value >= 0.0, "{s:?}");
        }
    }
    let bytes = family(&fams, "tapjail_disk_bytes");
    let read = bytes
        .samples
        .iter()
        .find(|s| s.label("op") == Some("read"))
        .unwrap();
    assert_eq!(read.value, 16.0 * 512.0);
    assert_eq!(read.label("tenant"), Some("alice"));
    assert_eq!(read.label("minor"), Some("3"));
    assert_eq!(read.label("frontend"), Some("fuse"));
    assert_eq!(read.label("image"), Some("aio:/srv/a.img"));
    let kicks = family(&fams, "tapjail_disk_kicks");
    let kick = |d: &str| {
        kicks
            .samples
            .iter()
            .find(|s| s.label("direction") == Some(d))
            .unwrap()
            .value
    };
    assert_eq!((kick("in"), kick("out")), (3.0, 2.0));
    let delay = family(&fams, "tapjail_disk_throttle_delay_seconds");
    let w = delay
        .samples
        .iter()
        .find(|s| s.label("op") == Some("write"))
        .unwrap();
    assert_eq!(w.value, 1.5);
}

#[test]
fn histogram_buckets_are_cumulative_seconds_with_inf() {
    let Some(fams) = parsed(&[disk(3, "/srv/a.img", "alice", true)]) else {
        return;
    };
    let h = family(&fams, "tapjail_disk_request_duration_seconds");
    let read: Vec<_> = h
        .samples
        .iter()
        .filter(|s| s.label("op") == Some("read"))
        .collect();
    let le = |v: &str| {
        read.iter()
            .find(|s| s.name.ends_with("_bucket") && s.label("le") == Some(v))
            .unwrap_or_else(|| panic!("no le={v} in {read:#?}"))
            .value
    };
    // 2 requests in the 100 µs bucket, 1 above 10 s.
    assert_eq!(le("0.000050"), 0.0);
    assert_eq!(le("0.000100"), 2.0);
    assert_eq!(le("10.000000"), 2.0);
    assert_eq!(le("+Inf"), 3.0);
    let one = |suffix: &str| {
        read.iter()
            .find(|s| s.name.ends_with(suffix))
            .unwrap()
            .value
    };
    assert_eq!(one("_count"), 3.0);
    assert!((one("_sum") - 20.000150).abs() < 1e-9);
    // A malformed histogram from a worker is not rendered at all.
    let mut d = disk(4, "/srv/b.img", "bob", true);
    d.stats
        .as_mut()
        .unwrap()
        .worker
        .histograms
        .read
        .counts
        .pop();
    let text = render(&[d]);
    assert!(!text.contains("op=\"read\",le="), "{text}");
}

#[test]
fn hostile_image_path_cannot_forge_lines_or_labels() {
    let Some(fams) = parsed(&[
        disk(3, HOSTILE, "mallory\"\\\n", true),
        disk(5, "/srv/ok.img", "alice", false),
    ]) else {
        return;
    };
    assert!(
        fams.iter()
            .all(|f| f.name.starts_with("tapjail_") && f.name != "forged"),
        "{fams:#?}"
    );
    for f in &fams {
        for s in &f.samples {
            let image = s.label("image").unwrap();
            let minor = s.label("minor").unwrap();
            match minor {
                "3" => {
                    assert_eq!(image, format!("aio:{HOSTILE}"), "{s:?}");
                    assert_eq!(s.label("tenant"), Some("mallory\"\\\n"));
                    if let Some(layer) = s.label("layer_name") {
                        assert_eq!(layer, HOSTILE);
                    }
                }
                "5" => assert_eq!(image, "aio:/srv/ok.img"),
                other => panic!("forged minor {other:?}: {s:?}"),
            }
        }
    }
    // The stats-less disk shows only as down, with its list figures.
    let up = family(&fams, "tapjail_disk_up");
    let v: Vec<_> = up
        .samples
        .iter()
        .map(|s| (s.label("minor").unwrap().to_string(), s.value))
        .collect();
    assert_eq!(v, [("3".to_string(), 1.0), ("5".to_string(), 0.0)]);
}

#[test]
fn escape_label_escapes_exactly_the_three_characters() {
    assert_eq!(escape_label("a\"b\\c\nd\te"), "a\\\"b\\\\c\\nd\te");
}

/// A reader racing rewrites sees one whole version or the other, never a
/// mix or a prefix.
#[test]
fn write_atomic_never_shows_a_partial_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tapjail.prom");
    let a = "a".repeat(1 << 20);
    let b = "b".repeat(3 << 19);
    write_atomic(&path, &a).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) || reads == 0 {
                let got = std::fs::read_to_string(&path).unwrap();
                assert!(got == a || got == b, "partial read of {} bytes", got.len());
                reads += 1;
            }
            reads
        });
        for i in 0..200 {
            write_atomic(&path, if i % 2 == 0 { &b } else { &a }).unwrap();
        }
        done.store(true, Ordering::Release);
        assert!(reader.join().unwrap() > 0);
    });
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["tapjail.prom"]);
    let err = write_atomic(&dir.path().join("missing/x.prom"), "x").unwrap_err();
    assert!(format!("{err:#}").contains("missing/x.prom"), "{err:#}");
}
