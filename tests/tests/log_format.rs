//! The broker's structured log end to end: a real tap-broker with
//! `frontend = "fuse"`, a real confined tapdisk and a real block device.
//! Its stderr (a file) gets one JSON object per line; requests carry their
//! fields; the worker's own JSON lines arrive tagged with its minor and pid;
//! `TAPJAIL_LOG` decides what is shown, for the broker and its workers; and
//! `TAPJAIL_LOG_FORMAT=human` gives plain lines. Needs root, /dev/fuse and
//! loop devices.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::fuse_loop_turn;

fn harness(env: &[(&'static str, &str)]) -> Harness {
    Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT],
        env: env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        ..Options::default()
    })
}

/// Create a disk on a 4 MiB raw image; its device path, pid and minor.
fn disk(h: &Harness) -> (PathBuf, u64, u64) {
    let img = h.raw_image("ops", "disk.img", 4 << 20);
    let dev = PathBuf::from(
        h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())])
            .trim(),
    );
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    let pid = rows[0]["pid"].as_u64().unwrap();
    let minor = rows[0]["minor"].as_u64().unwrap();
    (dev, pid, minor)
}

#[test]
fn broker_log_is_json_lines_with_request_fields_and_tagged_worker_lines() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = harness(&[("TAPJAIL_LOG", "debug")]);
    let (dev, pid, minor) = disk(&h);
    // Real I/O through the device.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 8192).unwrap();
    f.sync_all().unwrap();
    let mut back = [0u8; 4096];
    f.read_exact_at(&mut back, 8192).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    drop(f);
    let serving = |log: &str| {
        worker_events(log, pid)
            .iter()
            .any(|e| line_of(e).contains("\"message\":\"serving "))
    };
    assert!(
        eventually(Duration::from_secs(10), || serving(&h.broker_log())),
        "{}",
        h.broker_log()
    );
    h.ok(&ROOT, &["destroy", "-m", &minor.to_string()]);
    let log = h.broker_log();

    // Every line is one JSON object with a level, a message and a target.
    for l in log.lines() {
        let e: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|err| panic!("{err}: {l:?}\n{log}"));
        for key in ["timestamp", "level", "message", "target"] {
            assert!(e[key].is_string(), "no {key}: {l}");
        }
    }
    let events = log_events(&log);
    let banner = events
        .iter()
        .find(|e| e["message"].as_str().unwrap().starts_with("tap-broker "))
        .unwrap_or_else(|| panic!("no banner:\n{log}"));
    assert_eq!(banner["level"], "INFO");

    // The create request: its span names the verb, a request id, the
    // tenant, the peer and the image.
    let created = events
        .iter()
        .find(|e| e["span"]["op"] == "create" && e["message"] == "done")
        .unwrap_or_else(|| panic!("no create request:\n{log}"));
    assert_eq!(created["level"], "DEBUG");
    assert_eq!(created["span"]["name"], "request");
    assert_eq!(created["span"]["tenant"], "ops");
    assert_eq!(created["span"]["uid"], 0);
    assert!(created["span"]["id"].is_u64(), "{created}");
    assert!(
        created["span"]["image"]
            .as_str()
            .unwrap()
            .ends_with("/disk.img"),
        "{created}"
    );
    let destroyed = events
        .iter()
        .find(|e| e["span"]["op"] == "destroy")
        .unwrap_or_else(|| panic!("no destroy request:\n{log}"));
    assert_eq!(destroyed["span"]["minor"], minor, "{destroyed}");
    assert_ne!(destroyed["span"]["id"], created["span"]["id"]);

    // The confined worker's own lines (JSON, from after its seccomp filter
    // was loaded), relayed as strings under its pid and minor.
    let relayed = worker_events(&log, pid);
    let opened = relayed
        .iter()
        .find(|e| line_of(e).contains("image opened"))
        .unwrap_or_else(|| panic!("no 'image opened' from tapdisk[{pid}]:\n{log}"));
    assert_eq!(opened["minor"], minor, "{opened}");
    assert_eq!(opened["level"], "INFO", "{opened}");
    let inner: serde_json::Value = serde_json::from_str(line_of(opened)).unwrap();
    assert_eq!(inner["level"], "INFO");
    assert!(
        inner["image"].as_str().unwrap().ends_with("disk.img"),
        "{inner}"
    );
    assert!(inner.get("timestamp").is_none(), "{inner}");
    let serve = relayed
        .iter()
        .find(|e| line_of(e).contains("\"message\":\"serving "))
        .unwrap();
    assert_eq!(serve["minor"], minor, "{serve}");
    let inner: serde_json::Value = serde_json::from_str(line_of(serve)).unwrap();
    assert_eq!(inner["frontend"], "fuse");
}

/// `TAPJAIL_LOG=warn`: neither the broker's info lines (the banner) nor its
/// worker's (given the same filter) are written; `human` gives plain text.
#[test]
fn broker_log_filter_reaches_the_worker_and_human_format_is_plain() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = harness(&[("TAPJAIL_LOG", "warn")]);
    let (_dev, pid, minor) = disk(&h);
    h.ok(&ROOT, &["destroy", "-m", &minor.to_string()]);
    let log = h.broker_log();
    let events = log_events(&log);
    assert_eq!(events.len(), log.lines().count(), "{log}");
    assert!(
        events
            .iter()
            .all(|e| e["level"] == "WARN" || e["level"] == "ERROR"),
        "{log}"
    );
    assert!(worker_events(&log, pid)
        .iter()
        .all(|e| !line_of(e).contains("image opened")));
    drop(h);

    let h = harness(&[("TAPJAIL_LOG_FORMAT", "human")]);
    let log = h.broker_log();
    assert!(log_events(&log).is_empty(), "JSON lines: {log}");
    let banner = log
        .lines()
        .find(|l| l.contains(" tenant(s); audit "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(banner.contains(" INFO tap_broker: tap-broker "), "{banner}");
}
