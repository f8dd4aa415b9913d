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
    // Besides stdio and the control socket, only the io_uring rings made
    // before confinement (see sandbox::rings).
    let (basic, rest): (Vec<u32>, Vec<u32>) = fds.into_iter().partition(|&fd| fd <= 3);
    assert_eq!(basic, vec![0, 1, 2, 3], "stdio and the control socket");
    for fd in rest {
        let what = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(
            what.to_str(),
            Some("anon_inode:[io_uring]"),
            "fd {fd} is neither stdio, the control socket nor a ring"
        );
    }
    drop(sock);
    child.wait().unwrap();
}

fn selftest(what: &str) -> std::process::ExitStatus {
    Command::new(TAPDISK)
        .args(["--selftest-escape", what])
        .status()
        .unwrap()
}

/// The selftest for `frontend`: confined exactly as `tapdisk --broker
/// --frontend FRONTEND`, then attempting `what`.
fn selftest_for(frontend: &str, what: &str) -> std::process::Output {
    Command::new(TAPDISK)
        .args(["--selftest-escape", what, "--frontend", frontend])
        .output()
        .unwrap()
}

const FRONTENDS: [&str; 4] = ["nbd", "fuse", "ublk", "nbd-kernel"];

/// The JSON lines a selftest wrote, parsed.
fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Logging after confinement needs no syscall the filter forbids (it
/// would kill the worker with SIGSYS): a confined worker of every frontend
/// logs one event of each level, with fields, as JSON lines without
/// timestamps, and the filter it was given decides which are written.
#[test]
fn confined_worker_logs_every_level_as_json_lines_under_its_filter() {
    for fe in FRONTENDS {
        let out = Command::new(TAPDISK)
            .args(["--selftest-escape", "log", "--frontend", fe])
            .env("TAPJAIL_LOG", "trace")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{fe}: {:?}\n{err}", out.status);
        let events = json_lines(&out.stderr);
        let levels: Vec<&str> = events
            .iter()
            .filter(|e| e["message"].as_str().unwrap().starts_with("selftest: "))
            .map(|e| e["level"].as_str().unwrap())
            .collect();
        assert_eq!(
            levels,
            ["INFO", "ERROR", "WARN", "INFO", "DEBUG", "TRACE", "INFO"],
            "{fe}: {err}"
        );
        let error = events.iter().find(|e| e["level"] == "ERROR").unwrap();
        assert_eq!(error["minor"], 1, "{fe}: {error}");
        assert!(
            error["pid"].as_u64().is_some_and(|p| p > 1),
            "{fe}: {error}"
        );
        assert!(events.iter().all(|e| e.get("timestamp").is_none()), "{err}");
        assert!(err.starts_with(r#"{"level":""#), "{fe}: {err}");

        let out = Command::new(TAPDISK)
            .args(["--selftest-escape", "log", "--frontend", fe])
            .env("TAPJAIL_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{fe}: {:?}", out.status);
        let levels: Vec<String> = json_lines(&out.stderr)
            .iter()
            .map(|e| e["level"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(levels, ["ERROR", "WARN"], "{fe}");
    }
}

/// Issue 11's escape: after confinement, a ring of one's own (whose
/// operations seccomp never sees). io_uring_setup is off every allowlist.
#[test]
fn confined_worker_of_every_frontend_is_killed_when_it_makes_a_ring() {
    for fe in FRONTENDS {
        let out = selftest_for(fe, "io_uring_setup");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{fe}: expected death by SIGSYS, got {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The rings made before confinement refuse everything the attack did
/// through its own ring: sockets, connecting to a host socket, stat and
/// open of host paths (EACCES from the ring's restrictions, with and
/// without IOSQE_FIXED_FILE), for the file rings and ublk's queue rings.
#[test]
fn premade_rings_refuse_socket_connect_statx_and_openat() {
    for fe in FRONTENDS {
        for op in ["socket", "connect", "statx", "openat"] {
            let out = selftest_for(fe, &format!("ring-{op}"));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{fe} ring-{op}: {:?}\n{err}",
                out.status
            );
            let refused = err.matches("refused: ").count();
            let rings = if fe == "ublk" { 2 } else { 1 };
            assert_eq!(refused, 2 * rings, "{fe} ring-{op}: {err}");
            assert!(!err.contains("not refused"), "{fe} ring-{op}: {err}");
        }
    }
}

/// Seen from outside through `/proc/PID/root`: the worker's root is an
/// empty, read-only tmpfs, the only mount in its own mount namespace;
/// `/etc/shadow` and `/root` do not exist for it.
#[test]
fn worker_of_every_frontend_has_an_empty_root_in_its_own_mount_namespace() {
    if !require(
        is_root(),
        "needs root (a worker started as root gets an empty root)",
    ) {
        return;
    }
    for fe in FRONTENDS {
        let (mut child, sock) = spawn_broker_mode(fe, None);
        let pid = ready_pid(&sock);
        let root = format!("/proc/{pid}/root");
        let entries: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert!(entries.is_empty(), "{fe}: root not empty: {entries:?}");
        for p in ["etc/shadow", "root", "etc", "proc", "dev"] {
            let e = std::fs::symlink_metadata(format!("{root}/{p}")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{fe}: /{p}: {e}");
        }
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let lines: Vec<&str> = mounts.lines().collect();
        assert_eq!(lines.len(), 1, "{fe}: one mount only: {mounts}");
        let fields: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(fields[4], "/", "{fe}: {mounts}");
        assert!(
            fields[5].split(',').any(|o| o == "ro"),
            "{fe}: read-only: {mounts}"
        );
        assert!(lines[0].contains(" - tmpfs "), "{fe}: tmpfs: {mounts}");
        for ns in ["mnt", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{fe}: worker has its own {ns} namespace");
        }
        drop(sock);
        assert!(child.wait().unwrap().success());
    }
}

/// Not dumpable after the uid switch (which resets the flag): the kernel
/// then gives the process's /proc files to root instead of the worker's uid.
#[test]
fn worker_is_not_dumpable_after_switching_uid() {
    use std::os::unix::fs::MetadataExt;
    if !require(is_root(), "needs root to switch uid") {
        return;
    }
    let (mut child, sock) = spawn_broker_mode("nbd", None);
    let pid = ready_pid(&sock);
    let st = proc_status(pid);
    assert!(st["Uid"].starts_with("65534"), "{}", st["Uid"]);
    let meta = std::fs::metadata(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "a dumpable worker's /proc files belong to its uid"
    );
    drop(sock);
    assert!(child.wait().unwrap().success());
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

/// A worker started as root must get its own namespaces: if it cannot (here
/// CAP_SYS_ADMIN is taken from its bounding set, so root's unshare fails
/// with EPERM) it refuses to run instead of serving in the host's.
#[test]
fn root_worker_that_cannot_unshare_refuses_to_run() {
    if !require(is_root(), "needs root") {
        return;
    }
    /// linux/capability.h
    const CAP_SYS_ADMIN: libc::c_ulong = 21;
    let mut cmd = Command::new(TAPDISK);
    cmd.args(["--selftest-escape", "none"]);
    // SAFETY: prctl with integer arguments is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("confinement step 4 (namespaces): unshare(CLONE_NEWIPC)"),
        "{err}"
    );
}

/// Where `fs.suid_dumpable` is 1 the kernel makes a process dumpable
/// again when it switches uid, so only `PR_SET_DUMPABLE 0` *after* the
/// switch keeps the worker's memory from its uid's other processes (with
/// the default 0 the order does not show). The sysctl is machine-wide, so
/// this runs only inside nestvm's throwaway VM (`.ci/nestvm-tests`).
#[test]
#[ignore = "run inside nestvm: sets the machine-wide fs.suid_dumpable"]
fn nestvm_worker_is_not_dumpable_even_where_a_uid_switch_makes_processes_dumpable() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::env::var("TAPJAIL_IN_NESTVM").as_deref(),
        Ok("1"),
        "this test changes fs.suid_dumpable: run it through .ci/nestvm-tests"
    );
    const KNOB: &str = "/proc/sys/fs/suid_dumpable";
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(KNOB, &self.0);
        }
    }
    let _restore = Restore(std::fs::read_to_string(KNOB).unwrap());
    std::fs::write(KNOB, "1").unwrap();
    let (mut child, sock) = spawn_broker_mode("nbd", None);
    let pid = ready_pid(&sock);
    let meta = std::fs::metadata(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        meta.uid(),
        0,
        "worker is dumpable: its /proc files belong to uid {}",
        meta.uid()
    );
    drop(sock);
    assert!(child.wait().unwrap().success());
}

/// Where landlock would be the only barrier (it does not cover stat before
/// ABI 5), the empty root still leaves nothing to find.
#[test]
fn empty_root_hides_host_paths_from_stat_behind_landlock() {
    if !require(is_root(), "needs root to unshare a mount namespace") {
        return;
    }
    assert!(in_child("child_empty_root_stat").success());
}

#[test]
#[ignore = "runs only as a child of empty_root_hides_host_paths_from_stat_behind_landlock"]
fn child_empty_root_stat() {
    if std::env::var_os("TAPJAIL_CONFINEMENT_CHILD").is_none() {
        return;
    }
    use tapjail_worker::sandbox::{landlock, mount, ns};
    // Landlock alone lets stat through: the hole the empty root closes.
    let probe = std::thread::spawn(|| {
        landlock::deny_all().unwrap();
        std::fs::metadata("/etc/passwd").map(|m| m.len())
    });
    assert!(
        probe.join().unwrap().is_ok(),
        "landlock alone hides nothing from stat"
    );
    assert!(!ns::isolate(false).unwrap().is_empty());
    mount::empty_root().unwrap();
    landlock::deny_all().unwrap();
    for p in [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/proc/self",
        "/dev/null",
    ] {
        let e = std::fs::metadata(p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{p}: {e}");
    }
    // Nothing can be created in it either.
    let e = std::fs::create_dir("/x").unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)),
        "{e}"
    );
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

/// A worker told to join a mount namespace and chroot into a directory
/// of it (`--root-ns`, fds 4 and 5).
fn spawn_joining(
    ns: &OwnedFd,
    dir: &OwnedFd,
) -> (std::process::Child, std::os::unix::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    // Above 5, so that no dup2 overwrites another's source (and dup2 onto
    // the same number would keep close-on-exec).
    // SAFETY: fcntl on fds we own; the duplicates are closed below.
    let high = |fd: i32| unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    let fds = [
        high(theirs.as_raw_fd()),
        high(ns.as_raw_fd()),
        high(dir.as_raw_fd()),
    ];
    assert!(fds.iter().all(|&fd| fd >= 100));
    let mut cmd = Command::new(TAPDISK);
    cmd.args(["--broker", "--frontend", "fuse", "--root-ns"]);
    // SAFETY: only async-signal-safe dup2 in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in fds.into_iter().zip(3..) {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    for fd in fds {
        // SAFETY: the duplicates made above, ours alone.
        unsafe { libc::close(fd) };
    }
    (child, ours)
}

/// A fresh mount namespace (built on a thread of this test) and its root
/// directory: emptied as the broker does, or (`empty` false) a plain copy
/// of the host's mount tree.
fn root_ns(empty: bool) -> (OwnedFd, OwnedFd) {
    std::thread::spawn(move || {
        // SAFETY: flags only; this thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
        let ns = std::fs::File::open("/proc/thread-self/ns/mnt").unwrap();
        if empty {
            tapjail_common::empty_root::enter().unwrap();
        }
        // SAFETY: open of a NUL-terminated path; the fd becomes ours.
        let dir = unsafe {
            let fd = libc::open(
                c"/".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            assert!(fd >= 0);
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        (OwnedFd::from(ns), dir)
    })
    .join()
    .unwrap()
}

/// `--root-ns`: the worker joins the namespace it is given (no copy of
/// the host's mounts of its own) and ends up with the same empty root.
#[test]
fn worker_joins_the_given_empty_root_namespace() {
    if !require(is_root(), "needs root to join a mount namespace") {
        return;
    }
    let (ns, dir) = root_ns(true);
    let inode = std::os::unix::fs::MetadataExt::ino(
        &std::fs::File::from(ns.try_clone().unwrap())
            .metadata()
            .unwrap(),
    );
    let (mut child, sock) = spawn_joining(&ns, &dir);
    let pid = ready_pid(&sock);
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_eq!(theirs.to_str().unwrap(), format!("mnt:[{inode}]"));
    let root = format!("/proc/{pid}/root");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        0,
        "root not empty"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert_eq!(mounts.lines().count(), 1, "one mount only: {mounts}");
    assert!(mounts.contains(" - tmpfs "), "{mounts}");
    for ns in ["ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "its own {ns} namespace");
    }
    assert_eq!(proc_status(pid)["Seccomp"], "2");
    drop(sock);
    assert!(child.wait().unwrap().success());
}

/// The attack: fds 4 and 5 are a namespace with host paths in it (a fresh
/// copy of the host's mount tree) and its root. The worker refuses to run
/// there rather than trust it.
#[test]
fn worker_refuses_a_root_namespace_with_host_paths() {
    if !require(is_root(), "needs root to join a mount namespace") {
        return;
    }
    let (ns, dir) = root_ns(false);
    let (mut child, sock) = spawn_joining(&ns, &dir);
    match frame::recv_on::<_, FromWorker>(&sock, MAX_REQUEST_FRAME)
        .unwrap()
        .0
    {
        FromWorker::Error(m) => assert!(m.contains("not a read-only tmpfs"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(1));
}
