//! Online coalesce end to end: a real tap-broker and confined tapdisk
//! workers on FUSE + loop (root, /dev/fuse, loop). Data written before,
//! during and after the merge reads back byte-identical to a model, the
//! progress in `stats` goes up while the merge runs, and the merged
//! image checks clean and compares equal offline with qemu-img.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tapjail_tests::*;

mod coalesce_common;
use coalesce_common::*;
use tapjail_testsupport::fuse_loop_turn;

const MIB: usize = 1 << 20;
const SIZE_MIB: u64 = 64;

fn stats(h: &Harness) -> serde_json::Value {
    serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", "0"])).expect("stats JSON")
}

/// The merge's state and done/total chunks; `None` also while the
/// broker holds the minor for the merge's start or switch (stats is busy).
fn coalesce_stats(h: &Harness) -> Option<(String, u64, u64)> {
    let out = h.ctl(&ROOT, &["stats", "-m", "0"]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in progress"), "stats failed: {err}");
        return None;
    }
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    let c = s.get("coalesce")?;
    Some((
        c["state"].as_str()?.to_string(),
        c["done"].as_u64()?,
        c["total"].as_u64()?,
    ))
}

/// Base with data, an online snapshot, more data in the child, then the
/// merge (`flag`) at a slow rate while the test writes through the
/// device; returns the harness and paths for the direction's checks.
fn merge_under_writes(flag: &str, kill: bool) {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let base = h.vhd_image(ROOT.name, "base.vhd", SIZE_MIB);
    let child = h.root(ROOT.name).join("child.vhd");
    let dev = PathBuf::from(
        h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", base.display())])
            .trim(),
    );
    let mut model = vec![0u8; SIZE_MIB as usize * MIB];
    write(&dev, &mut model, 0, &pattern(1, 24 * MIB));
    h.ok(
        &ROOT,
        &["snapshot", "-m", "0", "-n", &child.display().to_string()],
    );
    write(&dev, &mut model, 16 * MIB, &pattern(2, 16 * MIB));
    let out = std::thread::scope(|s| {
        let job = s.spawn(|| {
            h.ctl(
                &ROOT,
                &["coalesce", "-m", "0", flag, "--rate", "4", "--json"],
            )
        });
        // Copying, part-way: progress seen, then seen going up.
        let mut first = None;
        let seen = eventually(Duration::from_secs(60), || {
            first = coalesce_stats(&h).filter(|(st, d, t)| st == "copying" && *d > 0 && d < t);
            first.is_some() || job.is_finished()
        });
        if job.is_finished() {
            let out = job.join().expect("coalesce thread");
            panic!(
                "coalesce {flag} ended before any progress was seen: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                h.broker_log()
            );
        }
        assert!(
            seen,
            "no progress in stats: {:?}\n{}",
            coalesce_stats(&h),
            h.broker_log()
        );
        let (_, d0, total) = first.unwrap();
        if kill {
            let l: serde_json::Value =
                serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).expect("list --json");
            let pid = l[0]["pid"].as_u64().expect("worker pid") as i32;
            // SAFETY: kill(2) on the worker pid the broker reported.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Guest writes racing the copy: over base-only data (streamed),
        // child data (committed) and holes.
        for (i, off) in [0, 5 * MIB, 17 * MIB, 23 * MIB + 4096, 40 * MIB]
            .iter()
            .enumerate()
        {
            write(&dev, &mut model, *off, &pattern(10 + i as u8, MIB / 2));
        }
        assert!(
            eventually(Duration::from_secs(60), || {
                coalesce_stats(&h).is_some_and(|(_, d, _)| d > d0 || d == total)
            }),
            "progress did not go up from {d0}: {:?}",
            coalesce_stats(&h)
        );
        job.join().expect("coalesce thread")
    });
    assert!(
        out.status.success(),
        "coalesce {flag}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        h.broker_log()
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).expect("coalesce --json");
    let merged = if flag == "--stream" { &child } else { &base };
    assert_eq!(
        done["chain"],
        serde_json::json!([merged.display().to_string()]),
        "{done}"
    );
    assert!(
        done["copied_bytes"].as_u64().unwrap() >= 8 * MIB as u64,
        "{done}"
    );
    assert_eq!(done["restarts"], u64::from(kill), "{done}");
    println!(
        "coalesce {flag} (kill: {kill}): I/O held {} us at the switch",
        done["stall_us"]
    );
    // Audited: the decision before, the outcome (the new chain) after.
    let audits: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["request"]["Coalesce"].is_object())
        .collect();
    assert_eq!(audits.len(), 2, "decision and outcome: {audits:?}");
    assert!(
        audits[1].to_string().contains("coalesce") && audits[1].to_string().contains("done"),
        "{}",
        audits[1]
    );
    let s = stats(&h);
    assert_eq!(s["coalesce"]["state"], "done", "{s}");
    assert_eq!(s["images"].as_array().unwrap().len(), 1, "{s}");
    // After the switch too.
    write(&dev, &mut model, 30 * MIB, &pattern(30, MIB));
    let dir = tempfile::tempdir().unwrap();
    assert!(
        read_back(&dev, dir.path()) == model,
        "device differs from the model after {flag}"
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    // Offline: the merged image stands alone and holds the model.
    check_merged_offline(merged, dir.path(), &model);
    drop(File::open(merged).unwrap());
}

/// Stream: the parent's blocks land in the child, which then stands alone
/// (a dynamic VHD) and holds every write made before, during and after.
#[test]
fn fuse_stream_under_writes_matches_the_model_and_stands_alone() {
    merge_under_writes("--stream", false);
}

/// Commit: the child's blocks land in the parent, which becomes the leaf
/// and holds every write made before, during and after.
#[test]
fn fuse_commit_under_writes_matches_the_model_and_serves_the_parent() {
    merge_under_writes("--commit", false);
}

/// A worker SIGKILLed mid-stream: its successor serves the consistent old
/// chain, the broker starts the merge again on it (resuming: the leaf
/// keeps what was streamed), and the result holds every write.
#[test]
fn fuse_stream_survives_a_worker_kill_mid_merge() {
    merge_under_writes("--stream", true);
}

/// A worker SIGKILLed mid-commit: the parent holds part of the child's
/// data, which the child overrides, so the chain reads as before; the
/// merge starts again and the parent ends up holding every write.
#[test]
fn fuse_commit_survives_a_worker_kill_mid_merge() {
    merge_under_writes("--commit", true);
}

fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Two disks over one base: committing one child into the base would
/// change the other disk's data, so it is refused with the minor that
/// shares it, and nothing changes; a stream (which writes only the leaf)
/// is allowed and leaves the other disk on its chain.
#[test]
fn nbd_commit_into_a_parent_another_disk_uses_is_refused_and_changes_nothing() {
    let h = Harness::start(Options {
        tenants: vec![ROOT],
        ..Options::default()
    });
    let base = h.vhd_image(ROOT.name, "base.vhd", 16);
    let kids = [
        h.root(ROOT.name).join("c1.vhd"),
        h.root(ROOT.name).join("c2.vhd"),
    ];
    for c in &kids {
        run_ok(
            Command::new(bin("tap-ctl"))
                .args(["vhd", "snapshot", "-n"])
                .arg(c)
                .arg("-p")
                .arg(&base),
        );
        h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", c.display())]);
    }
    let before = sha(&base);
    let out = h.ctl(&ROOT, &["coalesce", "-m", "0", "--commit"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a shared parent was committed into");
    assert!(
        err.contains("shared with minor 1") && err.contains(&base.display().to_string()),
        "{err}"
    );
    assert_eq!(sha(&base), before, "the refused commit wrote the base");
    let last = h.audit_lines().pop().unwrap();
    assert!(last["request"]["Coalesce"].is_object(), "{last}");
    assert!(last.to_string().contains("shared with minor 1"), "{last}");
    let s = stats(&h);
    assert_eq!(s["images"].as_array().unwrap().len(), 2, "{s}");
    assert!(s.get("coalesce").is_none(), "{s}");
    // A stream writes only minor 0's leaf.
    let out = h.ok(&ROOT, &["coalesce", "-m", "0", "--stream"]);
    assert!(out.contains("coalesce (stream)"), "{out}");
    assert_eq!(sha(&base), before, "the stream wrote the base");
    let s: serde_json::Value =
        serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", "1"])).expect("stats JSON");
    assert_eq!(s["images"][1]["name"], base.display().to_string(), "{s}");
    // Nothing left to merge on minor 0 now.
    let out = h.ctl(&ROOT, &["coalesce", "-m", "0", "--stream"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nothing to coalesce"),
        "{err}"
    );
}
