//! The broker checks a worker's confinement from outside before giving it
//! anything: a worker that stayed in the host's network or mount namespace
//! (a failed `unshare` used to be ignored), that is dumpable after its uid
//! switch, that kept root's uid, or that runs without no_new_privs or
//! without a seccomp filter, is killed and the request fails naming what is
//! missing.

use crate::*;

fn refused(step: &'static str, says: &str) {
    let h = Harness::start(Options {
        worker: WorkerBin::FakeSkipping(step),
        ..Options::default()
    });
    let img = h.raw_image("bob", "b.img", 1 << 20);
    let out = h.ctl(&BOB, &["create", "-a", &format!("aio:{}", img.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{step}: a weak worker was accepted");
    assert!(err.contains("is not confined"), "{step}: {err}");
    assert!(err.contains(says), "{step}: {err}");
    let pid: u32 = err
        .split("tapdisk ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{step}: no pid in {err}"));
    assert!(!alive(pid), "{step}: the refused worker {pid} still runs");
    assert!(alive(h.broker_pid()), "broker died:\n{}", h.broker_log());
}

#[test]
fn worker_in_the_host_namespaces_is_refused_and_killed() {
    refused("hostns", "in the host's net namespace");
}

/// A worker told to join the broker's empty root (`--root-ns`) that stays
/// in a mount namespace of its own (which could hold host paths) is
/// refused: the broker compares the namespace's inode with the empty
/// root's.
#[test]
fn worker_outside_the_empty_root_namespace_is_refused_and_killed() {
    refused("rootns", "not the empty root's");
}

#[test]
fn worker_dumpable_after_its_uid_switch_is_refused_and_killed() {
    refused("dumpable", "dumpable");
}

#[test]
fn worker_that_kept_root_uid_is_refused_and_killed() {
    refused("uid", "uids [0, 0, 0, 0], expected");
}

#[test]
fn worker_without_no_new_privs_is_refused_and_killed() {
    refused("nnp", "NoNewPrivs is 0");
}

#[test]
fn worker_without_a_seccomp_filter_is_refused_and_killed() {
    refused("seccomp", "Seccomp is 0, not 2 (filter)");
}
