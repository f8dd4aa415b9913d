//! The control plane's cost per attached disk (issue 14, item 4): what a
//! `create` pays must not grow with the disks already attached.

use crate::*;

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

/// Every `fork` the broker makes (the image-open helper, a worker's
/// spawn) copies its address space, so the broker keeps no thread, and
/// so no stack mapping, per attached disk: one thread reads every
/// worker's log pipe.
#[test]
fn ctlplane_broker_threads_and_mappings_do_not_grow_with_attached_disks() {
    const MORE: usize = 12;
    let h = Harness::start(Options::default());
    let create = |i: usize| {
        let img = h.raw_image(ROOT.name, &format!("d{i}.img"), 1 << 20);
        h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())]);
    };
    // Lazily made state (the log reader, the audit file) exists after one.
    create(0);
    let pid = h.broker_pid();
    let (t0, m0) = (threads(pid), mappings(pid));
    for i in 1..=MORE {
        create(i);
    }
    let (t1, m1) = (threads(pid), mappings(pid));
    assert_eq!(workers_of(pid).len(), MORE + 1, "every disk has its worker");
    assert!(
        t1 <= t0 + 3, // a client's thread may still be ending
        "{MORE} more disks took the broker from {t0} to {t1} threads"
    );
    assert!(
        m1 <= m0 + MORE,
        "{MORE} more disks took the broker from {m0} to {m1} mappings"
    );
}

fn real_uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The broker no longer reads every process's status to find a free
/// worker uid: the worker checks, with one clone against the kernel's
/// per-uid task count, that nobody else runs as its uid, and the broker
/// skips a uid that someone does. Without that check the worker below
/// would share its uid with a process tapjail never started (which could
/// then signal it, or count against its thread budget).
#[test]
fn ctlplane_a_worker_uid_another_process_runs_as_is_skipped() {
    use std::os::unix::process::CommandExt;
    let h = Harness::start(Options::default());
    let (lo, _) = h.worker_uids;
    // Someone else's process on `lo`, the uid the broker hands out first.
    let mut squatter = std::process::Command::new("sleep")
        .arg("600")
        .uid(lo)
        .gid(lo)
        .spawn()
        .expect("sleep as the first worker uid");
    assert_eq!(real_uid(squatter.id()), lo);
    let img = h.raw_image(ROOT.name, "d.img", 1 << 20);
    h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())]);
    let workers = workers_of(h.broker_pid());
    assert_eq!(workers.len(), 1, "one worker");
    assert_eq!(
        real_uid(workers[0]),
        lo + 1,
        "the worker runs as the next uid, not as the squatter's"
    );
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(
        warned(&log, &format!("worker uid {lo} is in use by a process")),
        "{log}"
    );
    squatter.kill().unwrap();
    squatter.wait().unwrap();
}

/// Audit group commit never acknowledges a request before its record is
/// written: creates race (so their fsyncs are shared), the broker is
/// SIGKILLed the moment the first is acknowledged, and every create that
/// was acknowledged has its decision and its outcome in the log, whose
/// chain is intact.
#[test]
fn ctlplane_broker_killed_right_after_acknowledged_creates_leaves_their_records() {
    const N: usize = 6;
    let mut h = Harness::start(Options::default());
    let imgs: Vec<String> = (0..N)
        .map(|i| {
            let p = h.raw_image(ROOT.name, &format!("kill{i}.img"), 1 << 20);
            p.display().to_string()
        })
        .collect();
    let broker = h.broker_pid();
    let (tx, rx) = std::sync::mpsc::channel();
    // All start together, to share fsyncs.
    let go = std::sync::Barrier::new(N);
    let acked: Vec<String> = std::thread::scope(|s| {
        for img in &imgs {
            let (tx, h, go) = (tx.clone(), &h, &go);
            s.spawn(move || {
                go.wait();
                let out = h.ctl(&ROOT, &["create", "-a", &format!("aio:{img}")]);
                let _ = tx.send((img.clone(), out.status.success()));
            });
        }
        drop(tx);
        let mut acked = Vec::new();
        for (img, ok) in rx {
            if ok {
                if acked.is_empty() {
                    // SAFETY: kill(2) on our own child's pid (not reaped yet).
                    unsafe { libc::kill(broker as i32, libc::SIGKILL) };
                }
                acked.push(img);
            }
        }
        acked
    });
    h.crash();
    assert!(!acked.is_empty(), "no create was acknowledged");
    let lines = h.audit_lines();
    for img in &acked {
        let about: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "request" && l["request"].to_string().contains(img.as_str()))
            .collect();
        assert!(
            about.iter().any(|l| l["outcome"] == "pending"),
            "acknowledged create of {img} has no decision line:\n{lines:#?}"
        );
        assert!(
            about
                .iter()
                .any(|l| l["outcome"].as_str().is_some_and(|o| o != "pending")),
            "acknowledged create of {img} has no outcome line:\n{lines:#?}"
        );
    }
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // A new broker adopts what the dead one left, and cleans up at the end.
    h.launch();
}

/// `destroy` waits on its worker's pidfd and reaps it itself (not on the
/// supervisor's next turn over every pidfd, a speed-up): when it returns
/// the worker is still gone, not even a zombie, and each exit is audited
/// once, as a stop, although the supervisor may see the same pidfd turn
/// readable and try to reap it too.
#[test]
fn ctlplane_destroy_returns_with_its_worker_reaped_and_its_exit_audited_once() {
    const DISKS: usize = 4;
    let h = Harness::start(Options::default());
    let mut pids = Vec::new();
    for i in 0..DISKS {
        let img = h.raw_image(ROOT.name, &format!("r{i}.img"), 1 << 20);
        h.ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())]);
    }
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    for row in rows.as_array().unwrap() {
        let (minor, pid) = (row["minor"].as_u64().unwrap(), row["pid"].as_u64().unwrap());
        h.ok(&ROOT, &["destroy", "-m", &minor.to_string()]);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "tapdisk {pid} still exists (unreaped) after destroy -m {minor} returned"
        );
        pids.push(pid);
    }
    assert_eq!(pids.len(), DISKS);
    let lines = h.audit_lines();
    for pid in pids {
        let exits: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "worker_exit" && l["peer"]["pid"] == pid)
            .collect();
        assert_eq!(
            exits.len(),
            1,
            "tapdisk {pid}'s exit audited {} times: {exits:#?}",
            exits.len()
        );
        assert_eq!(exits[0]["rule"], "worker-exit", "{}", exits[0]);
    }
}

/// Nice values (field 19 of each thread's stat) of every thread of `pid`.
fn thread_nices(pid: u32) -> Vec<i32> {
    let mut nices = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // ended
        };
        let rest = stat.rsplit_once(')').unwrap().1;
        nices.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
    }
    nices
}

fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
}

/// A create stopped (`TAPJAIL_TEST_STOP_AT=create-served`) once its
/// device is live, before the request returns: the nice values of its new
/// worker's threads and of the broker's then, and of both once tap-ctl
/// has returned.
fn create_nices(boost_ms: Option<u32>) -> [(Vec<i32>, Vec<i32>); 2] {
    let h = Harness::start(Options {
        tenants: vec![ROOT],
        extra: boost_ms.map_or(String::new(), |ms| format!("control_boost_ms = {ms}\n")),
        env: vec![("TAPJAIL_TEST_STOP_AT", "create-served".to_string())],
        ..Options::default()
    });
    let img = h.raw_image(ROOT.name, "b.img", 1 << 20);
    let broker = h.broker_pid();
    let mut create = h
        .ctl_command(&ROOT, &["create", "-a", &format!("aio:{}", img.display())])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn tap-ctl create");
    assert!(
        eventually(std::time::Duration::from_secs(30), || proc_state(broker)
            == Some('T')),
        "the broker never stopped at create-served:\n{}",
        h.broker_log()
    );
    let workers = workers_of(broker);
    assert_eq!(workers.len(), 1, "one worker: {workers:?}");
    let during = (thread_nices(workers[0]), thread_nices(broker));
    // SAFETY: kill takes integers; the broker is the harness's child.
    assert_eq!(unsafe { libc::kill(broker as i32, libc::SIGCONT) }, 0);
    assert!(
        create.wait().expect("tap-ctl create").success(),
        "{}",
        h.broker_log()
    );
    let after = (thread_nices(workers[0]), thread_nices(broker));
    [during, after]
}

/// A tenant's create runs boosted (`control_boost_ms`, nice -10): its
/// request thread and every thread of its new worker while the request
/// acts, which covers the worker reading the image and serving the
/// device's first reads; when tap-ctl has its answer, neither the worker
/// nor any broker thread is boosted any more, so the tenant's I/O runs at
/// the normal weight.
#[test]
fn ctlplane_a_create_and_its_worker_run_boosted_until_the_request_returns() {
    let [(worker, broker), (worker_after, broker_after)] = create_nices(None);
    assert!(
        !worker.is_empty() && worker.iter().all(|&n| n == -10),
        "the new worker's threads while the create acts: {worker:?}"
    );
    assert_eq!(
        broker.iter().filter(|&&n| n == -10).count(),
        1,
        "one broker thread (the request's) boosted: {broker:?}"
    );
    assert!(
        worker_after.iter().all(|&n| n == 0),
        "the worker's threads once the create returned: {worker_after:?}"
    );
    assert!(
        broker_after.iter().all(|&n| n == 0),
        "the broker's threads once the create returned: {broker_after:?}"
    );
}

/// `control_boost_ms = 0`: nothing is ever boosted.
#[test]
fn ctlplane_control_boost_ms_0_boosts_nothing() {
    let [(worker, broker), (worker_after, broker_after)] = create_nices(Some(0));
    for (what, nices) in [
        ("worker during", worker),
        ("broker during", broker),
        ("worker after", worker_after),
        ("broker after", broker_after),
    ] {
        assert!(nices.iter().all(|&n| n == 0), "{what}: {nices:?}");
    }
}
