//! The audit log cannot be flooded (issue 11 item 4). A peer matching no
//! tenant used to add 10 lines of 393 KB per 10 s window (Open frames
//! with a 65,500-byte path of `\x01`, JSON-escaped): 1.4 GB an hour from
//! one uid. Now one uid adds at most 64 KiB per window and all strangers
//! together at most 1 MiB, tenants' denials are budgeted too, and every
//! denial is still accounted for (in full or in a count).
//!
//! The window is set to an hour, so each flood falls in one window and
//! the bound is exact, with no dependence on timing: the flood client
//! waits for each answer (the broker records before it answers), and the
//! counts are written when the broker stops.

use crate::*;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;

const WINDOW_BYTES_PER_UID: u64 = 64 * 1024;
const WINDOW_BYTES_STRANGERS: u64 = 1024 * 1024;

fn flood(h: &Harness, uid: u32, gid: u32, mode: &str, count: u32) -> std::process::Child {
    std::process::Command::new(bin("audit-flood"))
        .args([h.socket.to_str().unwrap(), mode, &count.to_string()])
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn sent(child: std::process::Child, h: &Harness) -> u64 {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "flood client failed\n{}",
        h.broker_log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("flood client said {text:?}"))
}

/// Audit lines (raw text and parsed) after the first `skip` lines.
fn lines_after(h: &Harness, skip: usize) -> Vec<(usize, serde_json::Value)> {
    std::fs::read_to_string(&h.audit)
        .unwrap()
        .lines()
        .skip(skip)
        .map(|l| (l.len() + 1, serde_json::from_str(l).unwrap()))
        .collect()
}

/// Per uid: (bytes of its lines, denials written in full, denials counted).
fn by_uid(lines: &[(usize, serde_json::Value)]) -> HashMap<u64, (u64, u64, u64)> {
    let mut m: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    for (len, l) in lines {
        let Some(uid) = l["peer"]["uid"].as_u64() else {
            continue;
        };
        let e = m.entry(uid).or_default();
        e.0 += *len as u64;
        if l["event"] == "denials_suppressed" {
            e.2 += l["request"]["suppressed"].as_u64().unwrap();
        } else if l["decision"] == "deny" {
            e.1 += 1;
        }
    }
    m
}

#[test]
fn audit_flood_of_hostile_paths_is_bounded_per_uid_and_for_all_strangers() {
    let mut h = Harness::start(Options {
        extra: "audit_window_secs = 3600\n".into(),
        ..Options::default()
    });
    let start = std::fs::read_to_string(&h.audit).unwrap().lines().count();
    let size0 = std::fs::metadata(&h.audit).unwrap().len();
    // One stranger uid, 2,000 frames; then 12 more uids at once (a
    // subordinate range), 150 frames each.
    let one = sent(flood(&h, NOBODY.0, NOBODY.1, "stranger", 2000), &h);
    assert_eq!(one, 2000);
    let uids: Vec<u32> = (0..12).map(|i| 46_000 + i).collect();
    let kids: Vec<_> = uids
        .iter()
        .map(|&u| flood(&h, u, u, "stranger", 150))
        .collect();
    let mut want: HashMap<u64, u64> = HashMap::new();
    want.insert(u64::from(NOBODY.0), one);
    for (k, &u) in kids.into_iter().zip(&uids) {
        want.insert(u64::from(u), sent(k, &h));
    }
    // The broker still serves tenants.
    h.ok(&ALICE, &["list"]);
    // Every count is written by the time the broker has stopped.
    h.stop();
    let size1 = std::fs::metadata(&h.audit).unwrap().len();
    let lines = lines_after(&h, start);
    let per = by_uid(&lines);
    let mut strangers = 0;
    for (uid, n) in &want {
        let (bytes, full, counted) = per.get(uid).copied().unwrap_or_default();
        assert!(
            bytes <= WINDOW_BYTES_PER_UID,
            "uid {uid} added {bytes} bytes in one window"
        );
        assert_eq!(full + counted, *n, "uid {uid}: every denial accounted for");
        assert!(
            full >= 1,
            "uid {uid}: its first denials are written in full"
        );
        strangers += bytes;
    }
    let most = want
        .keys()
        .map(|u| per.get(u).map_or(0, |p| p.0))
        .max()
        .unwrap_or(0);
    eprintln!(
        "13 stranger uids, {} frames: {strangers} bytes in all, at most {most} from one uid",
        want.values().sum::<u64>()
    );
    assert!(
        strangers <= WINDOW_BYTES_STRANGERS,
        "strangers added {strangers} bytes"
    );
    // Whatever else was written (alice's list, the stop line) is small:
    // the file grew by little more than the strangers' budget.
    assert!(
        size1 - size0 <= strangers + 4096,
        "the log grew by {} bytes",
        size1 - size0
    );
    // Strangers' requests are logged by kind only: no path at all
    // (refusals at the connection limit carry no request).
    let kind_only = serde_json::json!({"kind": "Open"});
    for (_, l) in &lines {
        if l["peer"]["uid"] != ALICE.uid && l["event"] == "request" {
            assert!(
                l["rule"] == "max-clients" && l.get("request").is_none()
                    || l["request"] == kind_only,
                "{l}"
            );
        }
    }
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn audit_flood_of_a_tenants_denied_requests_is_bounded() {
    let mut h = Harness::start(Options {
        extra: "audit_window_secs = 3600\n".into(),
        ..Options::default()
    });
    let start = std::fs::read_to_string(&h.audit).unwrap().lines().count();
    // 300 denials of ~9 KB each (path and reason capped at 4 KiB): 2.7 MB
    // unbudgeted (and 800 MB before strings were capped).
    let n = sent(flood(&h, BOB.uid, BOB.gid, "tenant", 300), &h);
    assert_eq!(n, 300);
    // Allowed requests are never limited: alice's are all written.
    for _ in 0..3 {
        h.ok(&ALICE, &["list"]);
    }
    h.stop();
    let lines = lines_after(&h, start);
    let per = by_uid(&lines);
    let (bytes, full, counted) = per[&u64::from(BOB.uid)];
    eprintln!("tenant: {n} denied Opens, {bytes} bytes ({full} lines in full, {counted} counted)");
    assert!(bytes <= WINDOW_BYTES_PER_UID, "bob added {bytes} bytes");
    // Hello is allowed and written; every denial is in full or counted.
    assert_eq!(full + counted, n, "every denial accounted for");
    assert!(full >= 5, "a tenant's first denials are written in full");
    // In full, a tenant's request keeps its path, capped, with the whole
    // value's length and SHA-256.
    let hash = tapjail_common::audit::hash_hex("\x01".repeat(65_500).as_bytes());
    let denied: Vec<_> = lines
        .iter()
        .filter(|(_, l)| {
            l["peer"]["uid"] == BOB.uid && l["event"] == "request" && l["decision"] == "deny"
        })
        .collect();
    assert!(!denied.is_empty());
    for (len, l) in &denied {
        assert!(*len <= 3 * 4096 + 1024, "{len}-byte line");
        let path = l["request"]["Open"]["image"]["path"].as_str().unwrap();
        assert!(
            path.ends_with(&format!("…[cut: 65500 bytes in all, sha256 {hash}]")),
            "{path:.100}"
        );
    }
    let allowed = lines
        .iter()
        .filter(|(_, l)| l["peer"]["uid"] == ALICE.uid && l["decision"] == "allow")
        .count();
    assert_eq!(allowed, 3 * 2, "Hello and list, three times");
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
}
