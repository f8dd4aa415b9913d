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
