//! A broker SIGKILLed while an online coalesce holds the guest's I/O (after
//! the worker's `Hold`, before `Switch`): the restarted broker finishes the
//! merge on its own, the write the guest had in flight completes without
//! any further command, and the disk and the merged image hold the model.
//!
//! The broker stops itself at a named point (`TAPJAIL_TEST_STOP_AT`); the
//! test waits for the stopped state in `/proc`, then kills it there.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tapjail_tests::*;

mod coalesce_common;
use coalesce_common::*;
use tapjail_testsupport::fuse_loop_turn;

const MIB: usize = 1 << 20;
const SIZE_MIB: u64 = 32;
const LIMIT: Duration = Duration::from_secs(45);

fn stats(h: &Harness) -> Option<serde_json::Value> {
    let out = h.ctl(&ROOT, &["stats", "-m", "0"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("stats JSON"))
}

/// Merge with `flag`, the broker stopped at `point` and SIGKILLed there
/// with a guest write in flight, then restarted.
fn broker_killed_while_held(flag: &str, point: &str) {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let mut h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        env: vec![("TAPJAIL_TEST_STOP_AT", point.to_string())],
        ..Options::default()
    });
    let base = h.vhd_image(ROOT.name, "base.vhd", SIZE_MIB);
    let child = h.root(ROOT.name).join("child.vhd");
    let dev = PathBuf::from(
        h.ok(&ROOT, &["create", "-a", &format!("vhd:{}", base.display())])
            .trim(),
    );
    let mut model = vec![0u8; SIZE_MIB as usize * MIB];
    write(&dev, &mut model, 0, &pattern(1, 12 * MIB));
    h.ok(
        &ROOT,
        &["snapshot", "-m", "0", "-n", &child.display().to_string()],
    );
    write(&dev, &mut model, 8 * MIB, &pattern(2, 8 * MIB));
    let broker = h.broker_pid();
    let (off, data) = (4 * MIB + 4096, pattern(9, MIB));
    let mut merge = h
        .ctl_command(&ROOT, &["coalesce", "-m", "0", flag, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tap-ctl coalesce");
    let mut ended = || merge.try_wait().expect("try_wait").is_some();
    assert!(
        eventually(LIMIT, || proc_state(broker) == Some('T') || ended()),
        "the broker never reached {point}:\n{}",
        h.broker_log()
    );
    if ended() {
        let out = merge.wait_with_output().expect("tap-ctl output");
        panic!(
            "the coalesce ended before {point} ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            h.broker_log()
        );
    }
    // The worker holds I/O now: this write cannot complete until the
    // merge switches (or is released).
    let writer = std::thread::spawn({
        let (dev, data) = (dev.clone(), data.clone());
        move || write_dev(&dev, off, &data)
    });
    h.crash();
    let out = merge.wait_with_output().expect("tap-ctl coalesce");
    assert!(
        !out.status.success(),
        "the coalesce succeeded with its broker killed"
    );
    h.launch();
    // No command: the restarted broker finishes the merge on its own.
    assert!(
        eventually(LIMIT, || writer.is_finished()),
        "the guest's write stayed held after the broker restarted:\n{}",
        h.broker_log()
    );
    writer.join().expect("writer thread");
    model[off..off + data.len()].copy_from_slice(&data);
    let merged = if flag == "--stream" { &child } else { &base };
    let mut last = None;
    assert!(
        eventually(LIMIT, || {
            last = stats(&h);
            last.as_ref().is_some_and(|s| {
                s["images"].as_array().is_some_and(|i| i.len() == 1)
                    && s["images"][0]["name"] == merged.display().to_string()
            })
        }),
        "the disk does not serve {} alone: {last:?}\n{}",
        merged.display(),
        h.broker_log()
    );
    write(&dev, &mut model, 20 * MIB, &pattern(30, MIB));
    let dir = tempfile::tempdir().unwrap();
    assert!(
        read_back(&dev, dir.path()) == model,
        "device differs from the model after {flag} with the broker killed at {point}"
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    check_merged_offline(merged, dir.path(), &model);
}

/// Killed after Hold, before the record names the new chain: the new
/// broker records it and switches; the child stands alone.
#[test]
fn fuse_broker_killed_while_a_stream_holds_io_finishes_on_restart() {
    broker_killed_while_held("--stream", "coalesce-held");
}

/// Killed after the record names the streamed leaf alone, before Switch.
#[test]
fn fuse_broker_killed_after_recording_a_stream_finishes_on_restart() {
    broker_killed_while_held("--stream", "coalesce-recorded");
}

/// Killed after Hold of a commit: the parent holds everything, the new
/// broker records it as the leaf and switches.
#[test]
fn fuse_broker_killed_while_a_commit_holds_io_finishes_on_restart() {
    broker_killed_while_held("--commit", "coalesce-held");
}

/// Killed after the record names the parent, before Switch: the worker
/// still reports the child, so adoption replaces it and its successor
/// opens the parent the record names.
#[test]
fn fuse_broker_killed_after_recording_a_commit_serves_the_parent() {
    broker_killed_while_held("--commit", "coalesce-recorded");
}
