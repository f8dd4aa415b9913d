//! A worker's stderr reaches the broker's log only through the broker's
//! filter: tagged with its pid and minor, control bytes escaped, lines cut,
//! a flood cut to a burst with the number dropped written.

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
    let tag = format!("tapdisk[{pid}] minor {minor}: ");
    let dropped = |log: &str| {
        log.lines()
            .filter(|l| {
                l.starts_with(&tag) && l.ends_with("line(s) dropped (more than 10 lines/s)")
            })
            .filter_map(|l| l[tag.len()..].split(' ').next()?.parse::<u64>().ok())
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
    assert!(
        log.lines().any(|l| l
            == format!("{tag}\\x1b[2J\\x1b]0;pwned\\x07tap-broker: forged line\\x0dOVERWRITE")),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.starts_with("tap-broker: forged")));
    // The 100 KB line is cut, and so is every other line.
    assert!(
        log.lines().any(|l| l.starts_with(&format!("{tag}AAAA"))
            && l.ends_with(&format!("... ({} more bytes cut)", 100_000 - 512))),
        "{log}"
    );
    assert!(log.lines().all(|l| l.len() < 1024), "a line over 1 KiB");
    // The flood: at most a burst of it (plus what a second refills), the
    // rest counted.
    let mine = log.lines().filter(|l| l.starts_with(&tag)).count() as u64;
    assert!(mine <= 50 + 20, "{mine} lines of the worker's in the log");
    let flood_shown = log
        .lines()
        .filter(|l| l.starts_with(&format!("{tag}flood ")))
        .count() as u64;
    assert!(
        flood_shown + dropped(&log) >= 5000,
        "flood lines shown {flood_shown}, counted {}",
        dropped(&log)
    );
}
