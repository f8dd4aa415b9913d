//! The worker's confinement, proven from outside: every test runs tapdisk
//! (or this test binary) as a child process, so the test runner itself is
//! never confined.

mod support;

use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use support::*;
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_common::worker_proto::FromWorker;

fn ready_pid(sock: &std::os::unix::net::UnixStream) -> u32 {
    match frame::recv_on::<_, FromWorker>(sock, MAX_REQUEST_FRAME)
        .unwrap()
        .0
    {
        FromWorker::Ready { pid } => pid,
        other => panic!("expected Ready, got {other:?}"),
    }
}

#[test]
fn broker_mode_worker_is_confined_as_seen_in_proc_status() {
    let (mut child, sock) = spawn_broker_mode("nbd", None);
    let pid = ready_pid(&sock);
    assert_eq!(pid, child.id());
    let st = proc_status(pid);
    assert_eq!(st["Seccomp"], "2", "seccomp filter mode");
    assert_eq!(st["NoNewPrivs"], "1");
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{set}");
    }
    let uids: Vec<u32> = st["Uid"]
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    if require(
        is_root(),
        "root: only a worker started as root drops to nobody",
    ) {
        assert_eq!(uids, vec![65534; 4], "root workers drop to nobody");
        assert_eq!(st["CapBnd"], "0000000000000000", "bounding set emptied");
    }
    assert!(
        uids.iter().all(|&u| u != 0),
        "worker must not run as root: {uids:?}"
    );
    if require(
        is_root(),
        "root: only root can give the worker its own namespaces",
    ) {
        for ns in ["net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "worker has its own {ns} namespace");
        }
    }
    let vmlck: u64 = st["VmLck"].trim_end_matches(" kB").trim().parse().unwrap();
    assert!(vmlck > 0, "memory must be locked");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let nproc = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .unwrap();
    let v: Vec<&str> = nproc.split_whitespace().collect();
    assert_eq!(v[2], v[3], "NPROC soft = hard: {nproc}");
    assert!(v[2].parse::<u64>().is_ok(), "NPROC is bounded: {nproc}");
    // Closing the control socket makes the worker exit cleanly.
    drop(sock);
    assert!(child.wait().unwrap().success());
}

#[test]
fn broker_mode_worker_closes_fds_it_was_not_meant_to_have() {
    let stray: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let (mut child, sock) = spawn_broker_mode("nbd", Some(&stray));
    let pid = ready_pid(&sock);
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort();
    assert_eq!(fds, vec![0, 1, 2, 3], "only stdio and the control socket");
    drop(sock);
    child.wait().unwrap();
}

fn selftest(what: &str) -> std::process::ExitStatus {
    Command::new(TAPDISK)
        .args(["--selftest-escape", what])
        .status()
        .unwrap()
}

#[test]
fn confined_worker_is_killed_by_sigsys_when_it_tries_to_escape() {
    for what in ["open", "execve", "socket", "ptrace", "fork"] {
        let status = selftest(what);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{what}: expected death by SIGSYS, got {status:?}"
        );
    }
}

#[test]
fn confined_worker_may_still_run_threads_and_exit_cleanly() {
    // The control for the test above: confinement itself does not kill.
    assert!(selftest("none").success());
    assert!(selftest("thread").success());
}

#[test]
fn too_small_memlock_limit_is_a_clear_error_naming_the_limit() {
    let out = {
        let mut cmd = Command::new(TAPDISK);
        cmd.args(["--selftest-escape", "none"]);
        // SAFETY: setrlimit is async-signal-safe; lowering needs no privilege.
        unsafe {
            cmd.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: 256 * 1024,
                    rlim_max: 256 * 1024,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK is 262144 bytes"), "{err}");
    assert!(err.contains("raise RLIMIT_MEMLOCK to at least"), "{err}");
}

/// Run this binary's `child_` test `name` in a fresh process and return
/// its status; the child applies one confinement step to itself.
fn in_child(name: &str) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TAPJAIL_CONFINEMENT_CHILD", "1")
        .status()
        .unwrap()
}

#[test]
fn landlock_deny_all_makes_open_fail_with_eacces() {
    assert!(in_child("child_landlock_open").success());
}

#[test]
#[ignore = "runs only as a child of landlock_deny_all_makes_open_fail_with_eacces"]
fn child_landlock_open() {
    if std::env::var_os("TAPJAIL_CONFINEMENT_CHILD").is_none() {
        return;
    }
    // Before: readable.
    assert!(
        std::fs::File::open("/etc/hostname").is_ok() || std::fs::File::open("/etc/passwd").is_ok()
    );
    tapjail_worker::sandbox::landlock::deny_all().unwrap();
    let e = std::fs::File::open("/etc/passwd").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = std::fs::File::create("/tmp/tapjail-landlock-probe").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = std::fs::read_dir("/").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
}

#[test]
fn dropping_caps_after_switching_ids_leaves_nothing() {
    if !require(is_root(), "needs root to switch ids") {
        return;
    }
    assert!(in_child("child_ids_and_caps").success());
}

#[test]
#[ignore = "runs only as a child of dropping_caps_after_switching_ids_leaves_nothing"]
fn child_ids_and_caps() {
    if std::env::var_os("TAPJAIL_CONFINEMENT_CHILD").is_none() {
        return;
    }
    use tapjail_worker::sandbox::{caps, ids};
    ids::switch_to(ids::Ids {
        uid: 65533,
        gid: 65533,
    })
    .unwrap();
    caps::drop_all().unwrap();
    assert_eq!(ids::current_uids(), (65533, 65533, 65533));
    assert_eq!(ids::current_gids(), (65533, 65533, 65533));
    // No way back to root.
    // SAFETY: setuid with an integer; expected to fail.
    assert_ne!(unsafe { libc::setuid(0) }, 0);
    assert!(ids::switch_to(ids::Ids { uid: 0, gid: 0 }).is_err());
}
