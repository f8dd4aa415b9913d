//! A worker's stderr reaches the broker's log only through the broker's
//! filter: each line one event of target `tapdisk` whose `pid` and `minor`
//! the broker sets, the worker's bytes an escaped, cut `line` string; a
//! flood cut to a burst with the number dropped logged.

use crate::*;
use std::time::Duration;

#[test]
fn worker_log_escapes_cuts_and_rate_limits_a_hostile_workers_output() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    });
    let img = h.root("alice").join("noisy.img");
    std::fs::write(&img, b"STDERR\n").unwrap();
    h.own(&img);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).unwrap();
    let pid = rows[0]["pid"].as_u64().unwrap();
    let minor = rows[0]["minor"].as_u64().unwrap();
    // The worker exits on destroy; its pipe closes and the reader writes
    // what it still holds, the drop count last.
    h.ok(&ALICE, &["destroy", "-m", &minor.to_string()]);
    let mine = |log: &str| -> Vec<serde_json::Value> {
        worker_events(log, pid)
            .into_iter()
            .filter(|e| e["minor"].as_u64() == Some(minor))
            .collect()
    };
    let dropped = |log: &str| {
        mine(log)
            .iter()
            .filter_map(|e| e["dropped"].as_u64())
            .sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(10), || dropped(&h.broker_log()) > 0),
        "no drop count in the broker's log:\n{}",
        h.broker_log()
    );
    let raw = std::fs::read(&h.log).unwrap();
    let log = String::from_utf8_lossy(&raw).into_owned();
    // No byte that drives a terminal or forges a line start.
    for bad in [0x1bu8, 0x07, b'\r'] {
        assert!(
            !raw.contains(&bad),
            "byte {bad:#x} reached the broker's log"
        );
    }
    let events = mine(&log);
    let lines: Vec<&str> = events.iter().map(line_of).collect();
    assert!(
        lines.contains(&"\\x1b[2J\\x1b]0;pwned\\x07tap-broker: forged line\\x0dOVERWRITE"),
        "{log}"
    );
    // The 100 KB line is cut, and so is every other line.
    let cut = events
        .iter()
        .find(|e| line_of(e).starts_with("AAAA"))
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(cut["cut"], 100_000 - 512, "{cut}");
    assert!(line_of(cut).ends_with(&format!("... ({} more bytes cut)", 100_000 - 512)));
    assert!(log.lines().all(|l| l.len() < 1024), "a line over 1 KiB");
    // The flood: at most a burst of it (plus what a second refills), the
    // rest counted.
    let shown = events.iter().filter(|e| e.get("line").is_some()).count() as u64;
    assert!(shown <= 50 + 20, "{shown} lines of the worker's in the log");
    let flood_shown = lines.iter().filter(|l| l.starts_with("flood ")).count() as u64;
    assert!(
        flood_shown + dropped(&log) >= 5000,
        "flood lines shown {flood_shown}, counted {}",
        dropped(&log)
    );
}

/// The forgery attempt: a worker writes JSON lines claiming minor 999, pid
/// 1 and the broker's target, one glued to the next by a newline. Each is
/// logged as the worker's own line, under its real pid and minor, and no
/// event of the log claims minor 999 or carries the forged messages.
#[test]
fn worker_log_attributes_forged_lines_to_the_worker_that_wrote_them() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    });
    let img = h.root("alice").join("forger.img");
    std::fs::write(&img, b"STDERR\n").unwrap();
    h.own(&img);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ALICE, &["list", "--json"])).unwrap();
    let pid = rows[0]["pid"].as_u64().unwrap();
    let minor = rows[0]["minor"].as_u64().unwrap();
    let forged = |log: &str| {
        worker_events(log, pid)
            .into_iter()
            .filter(|e| line_of(e).contains("forged serving") || line_of(e).contains("\"forged\""))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || forged(&h.broker_log()) == 2),
        "{}",
        h.broker_log()
    );
    let log = h.broker_log();
    let events = worker_events(&log, pid);
    let first = events
        .iter()
        .find(|e| line_of(e).contains("\"forged\""))
        .unwrap();
    assert_eq!(first["minor"], minor, "{first}");
    assert_eq!(first["pid"], pid, "{first}");
    assert_eq!(first["target"], "tapdisk", "{first}");
    assert_eq!(first["message"], "worker line", "{first}");
    assert_eq!(
        line_of(first),
        r#"{"level":"ERROR","message":"forged","minor":999,"pid":1,"target":"tap_broker"}"#
    );
    // The glued line is a line of its own, attributed the same way.
    let glued = events
        .iter()
        .find(|e| line_of(e).contains("forged serving"))
        .unwrap();
    assert_eq!(glued["minor"], minor, "{glued}");
    assert_eq!(glued["pid"], pid, "{glued}");
    assert!(events.iter().any(|e| line_of(e) == "ok"));
    for e in log_events(&log) {
        assert_ne!(e["minor"], 999, "a forged minor: {e}");
        assert_ne!(e["message"], "forged", "{e}");
        assert_ne!(e["message"], "forged serving", "{e}");
        if e["target"] != "tapdisk" {
            assert!(!e.to_string().contains("forged"), "{e}");
        }
    }
}
