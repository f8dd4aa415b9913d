//! A worker taken over by its image (the fake one, whose "image" picks the
//! hostile behaviour) talks nonsense to the broker on its control socket.
//! For each behaviour: the broker stays up, another tenant's disk created
//! before keeps being served, the hostile minor ends in a clear state (the
//! request fails with a clear error and leaves nothing, or the minor is
//! DEAD and can be destroyed), no fd leaks into the broker, and the audit
//! log names the worker.

use crate::*;
use std::path::PathBuf;
use std::time::Duration;

/// A broker on the fake worker with bob's disk already served (minor 0).
struct Scene {
    h: Harness,
    bob_sock: PathBuf,
    /// The broker's open fds with bob's disk up and nothing else.
    baseline_fds: usize,
}

fn scene() -> Scene {
    scene_with(false)
}

fn scene_with(respawn: bool) -> Scene {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        worker_timeout_secs: 3,
        respawn,
        ..Options::default()
    });
    let img = h.raw_image("bob", "b.img", 1 << 20);
    h.ok(&BOB, &["create", "-a", &format!("aio:{}", img.display())]);
    let bob_sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    // alice's legitimate parent, for the behaviours that ask for one.
    h.raw_image("alice", "base.img", 1 << 20);
    // Baseline once the broker holds no client connection (tap-ctl has
    // exited, but the broker closes its end when it sees that).
    assert!(
        eventually(Duration::from_secs(10), || control_connections(&h) == 0),
        "the broker keeps {} client connections",
        control_connections(&h)
    );
    let baseline_fds = fd_count(h.broker_pid());
    Scene {
        h,
        bob_sock,
        baseline_fds,
    }
}

impl Scene {
    /// A hostile image for alice whose first line is `line`.
    fn image(&self, file: &str, line: &[u8]) -> String {
        let p = self.h.root("alice").join(file);
        let mut content = line.to_vec();
        content.push(b'\n');
        std::fs::write(&p, content).unwrap();
        self.h.own(&p);
        format!("aio:{}", p.display())
    }

    /// Broker up, bob's disk listed, its stats answered, its socket served.
    fn others_unharmed(&self) {
        let h = &self.h;
        assert!(alive(h.broker_pid()), "broker died:\n{}", h.broker_log());
        let rows: serde_json::Value =
            serde_json::from_str(&h.ok(&BOB, &["list", "--json"])).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["minor"], 0, "{rows:?}");
        assert_eq!(rows[0]["state"], 0, "{rows:?}");
        let stats: serde_json::Value =
            serde_json::from_str(&h.ok(&BOB, &["stats", "-m", "0"])).unwrap();
        assert!(
            stats["images"][0]["name"]
                .as_str()
                .unwrap()
                .ends_with("b.img"),
            "{stats}"
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&self.bob_sock).is_ok(),
            "bob's NBD socket is no longer served"
        );
    }

    /// Nothing of alice's is left: no rows, no worker, no fd in the broker.
    fn alice_left_nothing(&self) {
        let h = &self.h;
        assert!(
            eventually(Duration::from_secs(10), || h
                .ok(&ALICE, &["list"])
                .is_empty()),
            "{}",
            h.ok(&ALICE, &["list"])
        );
        assert!(
            eventually(Duration::from_secs(10), || workers_of(h.broker_pid()).len()
                == 1),
            "hostile worker not reaped: {:?}",
            workers_of(h.broker_pid())
        );
        assert!(
            eventually(Duration::from_secs(5), || fd_count(h.broker_pid())
                == self.baseline_fds),
            "broker fds: {} now, {} before",
            fd_count(h.broker_pid()),
            self.baseline_fds
        );
    }

    /// The audit log has alice's failed request whose outcome says `why`
    /// and names a tapdisk pid, and that worker's exit, which says the
    /// broker killed it for `why`.
    fn audited(&self, why: &str) -> u32 {
        let pid = self.audited_failure(why);
        let exit = self
            .h
            .audit_lines()
            .into_iter()
            .find(|l| l["event"] == "worker_exit" && l["peer"]["pid"] == pid)
            .unwrap();
        assert_eq!(exit["rule"], "worker-killed", "{exit}");
        let reason = exit["reason"].as_str().unwrap();
        assert!(
            reason.contains("killed by tap-broker") && reason.contains(why),
            "{exit}"
        );
        pid
    }

    /// The audit log has alice's failed request whose outcome says `why`
    /// and names a tapdisk pid, and that worker's exit.
    fn audited_failure(&self, why: &str) -> u32 {
        let h = &self.h;
        let lines = h.audit_lines();
        let req = lines
            .iter()
            .rfind(|l| {
                l["tenant"] == "alice"
                    && l["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with("error") && o.contains(why))
            })
            .unwrap_or_else(|| panic!("no audited failure with {why:?}:\n{lines:#?}"));
        let pid = worker_pid_in(req["outcome"].as_str().unwrap());
        assert!(
            eventually(Duration::from_secs(5), || h.audit_lines().iter().any(|l| {
                l["event"] == "worker_exit" && l["peer"]["pid"] == pid && l["tenant"] == "alice"
            })),
            "exit of tapdisk {pid} not audited"
        );
        pid
    }

    /// alice's create of `line` fails with `why` and the broker kills the
    /// worker for it; everything else holds.
    fn create_refused(&self, file: &str, line: &[u8], why: &str) {
        self.create_refused_with(file, line, why, true)
    }

    /// Like `create_refused`, but the worker may have exited on its own
    /// first (`killed` false: it closes the socket and exits).
    fn create_refused_with(&self, file: &str, line: &[u8], why: &str, killed: bool) {
        let spec = self.image(file, line);
        let err = self.h.fails(&ALICE, &["create", "-a", &spec]);
        assert!(
            err.contains(why),
            "{}: {err}",
            String::from_utf8_lossy(line)
        );
        assert!(err.contains("tapdisk"), "{err}");
        if killed {
            self.audited(why);
        } else {
            self.audited_failure(why);
        }
        self.alice_left_nothing();
        self.others_unharmed();
    }

    /// alice's create of `line` fails with `why` said by the worker, which
    /// is then stopped (it followed the protocol); everything else holds.
    fn create_failed(&self, file: &str, line: &[u8], why: &str) {
        let spec = self.image(file, line);
        let err = self.h.fails(&ALICE, &["create", "-a", &spec]);
        assert!(
            err.contains(why),
            "{}: {err}",
            String::from_utf8_lossy(line)
        );
        let pid = self.audited_failure(why);
        let exit = self
            .h
            .audit_lines()
            .into_iter()
            .find(|l| l["event"] == "worker_exit" && l["peer"]["pid"] == pid)
            .unwrap();
        assert_eq!(exit["rule"], "worker-exit", "{exit}");
        self.alice_left_nothing();
        self.others_unharmed();
    }

    /// alice's create of `line` succeeds (the hostile act comes later) on
    /// minor 1; returns its worker's pid.
    fn create_served(&self, file: &str, line: &[u8]) -> u32 {
        let spec = self.image(file, line);
        self.h.ok(&ALICE, &["create", "-a", &spec]);
        let rows: serde_json::Value =
            serde_json::from_str(&self.h.ok(&ALICE, &["list", "--json"])).unwrap();
        assert_eq!(rows[0]["minor"], 1, "{rows}");
        rows[0]["pid"].as_u64().unwrap() as u32
    }

    /// Wait until fake worker `pid` says it has sent its unasked frames
    /// (they are then in the broker's socket, whatever the broker does).
    fn sent_unasked(&self, pid: u32) {
        let said = format!("fake-tapdisk {pid}: sent unasked");
        assert!(
            eventually(Duration::from_secs(30), || self
                .h
                .broker_log()
                .contains(&said)),
            "tapdisk {pid} never sent its unasked frames:\n{}",
            self.h.broker_log()
        );
    }

    /// alice's minor 1 is DEAD, refuses work clearly, and destroy clears it.
    fn dead_then_destroyed(&self, pid: u32) {
        let h = &self.h;
        assert!(
            eventually(Duration::from_secs(5), || h
                .ok(&ALICE, &["list"])
                .contains("state=0x1 ")),
            "{}",
            h.ok(&ALICE, &["list"])
        );
        assert!(!alive(pid));
        assert!(h.fails(&ALICE, &["stats", "-m", "1"]).contains("is dead"));
        h.ok(&ALICE, &["destroy", "-m", "1"]);
        self.alice_left_nothing();
        self.others_unharmed();
    }
}

fn worker_pid_in(text: &str) -> u32 {
    let at = text.find("tapdisk ").expect("names a tapdisk") + "tapdisk ".len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

#[test]
fn hostile_worker_garbage_reply_to_open_is_refused() {
    let s = scene();
    s.create_refused("garbage.img", b"GARBAGE", "malformed frame");
    s.create_refused("noise.img", b"NOISE", "exceeds the 65536-byte limit");
}

#[test]
fn hostile_worker_oversized_or_truncated_frame_is_refused() {
    let s = scene();
    s.create_refused(
        "huge.img",
        b"FRAMELEN:4294967295:hang",
        "frame of 4294967295 bytes exceeds the 65536-byte limit",
    );
    s.create_refused_with(
        "huge-close.img",
        b"FRAMELEN:4294967295:close",
        "exceeds the 65536-byte limit",
        false,
    );
    s.create_refused(
        "just-over.img",
        b"FRAMELEN:65537:hang",
        "frame of 65537 bytes exceeds",
    );
    s.create_refused_with(
        "cut.img",
        b"FRAMELEN:60000:close",
        "in the middle of a frame",
        false,
    );
    s.create_refused(
        "stall.img",
        b"FRAMELEN:60000:hang",
        "did not answer within 3 s",
    );
}

#[test]
fn hostile_worker_wrong_reply_to_open_is_refused() {
    let s = scene();
    for msg in ["Ready", "Serving", "Ok", "Stats"] {
        s.create_refused(
            &format!("reply-{msg}.img"),
            format!("REPLY:{msg}").as_bytes(),
            &format!("answered {msg} while opening"),
        );
    }
    s.create_refused(
        "long-chain.img",
        b"REPLY:LongChain",
        "reported a chain of 20000 images",
    );
    s.create_refused(
        "no-chain.img",
        b"REPLY:NoChain",
        "reported a chain of 0 images",
    );
    // An extra message after Opened: seen before Serve is sent, or read as
    // the answer to Serve, which it is not.
    s.create_refused("extra-ok.img", b"EXTRA:Ok", "broke the protocol");
}

#[test]
fn hostile_worker_unsolicited_reply_kills_it_and_is_never_taken_as_an_answer() {
    let s = scene();
    // A Stats "reply" to a request never sent, while the disk is idle.
    let pid = s.create_served("late-stats.img", b"LATE:Stats");
    s.sent_unasked(pid);
    let err = s.h.fails(&ALICE, &["stats", "-m", "1"]);
    assert!(err.contains("unsolicited"), "{err}");
    assert!(!err.contains("FORGED"), "{err}");
    assert_eq!(s.audited("unsolicited"), pid);
    s.dead_then_destroyed(pid);
}

#[test]
fn hostile_worker_extra_serving_does_not_shift_later_answers() {
    let s = scene();
    // Serving sent ahead of time: either seen before Serve is sent (the
    // create fails), or it answers Serve and the real one then sits in the
    // socket, where it must not be read as the answer to the next request.
    let spec = s.image("extra-serving.img", b"EXTRA:Serving");
    let out = s.h.ctl(&ALICE, &["create", "-a", &spec]);
    if out.status.success() {
        let pid = s.h.ok(&ALICE, &["list", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&pid).unwrap();
        let pid = rows[0]["pid"].as_u64().unwrap() as u32;
        let err = s.h.fails(&ALICE, &["stats", "-m", "1"]);
        assert!(err.contains("unsolicited"), "{err}");
        assert_eq!(s.audited("unsolicited"), pid);
        s.dead_then_destroyed(pid);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unsolicited"), "{err}");
        s.audited("unsolicited");
        s.alice_left_nothing();
        s.others_unharmed();
    }
    // Unsolicited Ready while idle, caught by a pause.
    let pid = s.create_served("late-ready.img", b"LATE:Ready");
    s.sent_unasked(pid);
    let err = s.h.fails(&ALICE, &["pause", "-m", "1"]);
    assert!(err.contains("unsolicited"), "{err}");
    s.dead_then_destroyed(pid);
}

#[test]
fn hostile_worker_parent_flood_stops_at_the_chain_limit_and_releases_files() {
    let s = scene();
    s.create_refused(
        "flood.img",
        b"FLOOD:500:base.img",
        "chain deeper than 64 images",
    );
    let allowed =
        s.h.audit_lines()
            .into_iter()
            .filter(|l| {
                l["event"] == "parent_open" && l["decision"] == "allow" && l["outcome"] != "pending"
            })
            .count();
    assert_eq!(allowed, 65, "one audited open per request up to the limit");
    // Every read-only claim on base.img was released: it opens writable.
    let base = format!("aio:{}", s.h.root("alice").join("base.img").display());
    s.h.ok(&ALICE, &["create", "-a", &base]);
    s.h.ok(&ALICE, &["destroy", "-m", "1"]);
    s.create_refused(
        "locators.img",
        b"LOCATORS:100:base.img",
        "100 parent locators (limit 16)",
    );
}

#[test]
fn hostile_worker_absurd_parent_paths_are_refused_and_audited() {
    let s = scene();
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "shadow.img",
            b"PARENT:/etc/shadow",
            "outside tenant alice's image roots",
        ),
        (
            "dotdot.img",
            b"PARENT:../../../../../../../../../../etc/shadow",
            "parent refused",
        ),
        (
            "nul.img",
            b"PARENT:base.img\0/../../etc/shadow",
            "parent refused",
        ),
        ("long.img", b"LONGPARENT:30000", "parent refused"),
        ("child.img", b"CHILD:/etc/shadow:base.img", "never opened"),
        (
            "empty.img",
            b"LOCATORS:0:base.img",
            "names no parent locator",
        ),
    ];
    for (file, line, why) in cases {
        let before = s.h.audit_lines().len();
        s.create_failed(file, line, why);
        let denied: Vec<_> = s.h.audit_lines()[before..]
            .iter()
            .filter(|l| l["event"] == "parent_open")
            .cloned()
            .collect();
        assert!(
            !denied.is_empty() && denied.iter().all(|l| l["decision"] == "deny"),
            "{}: {denied:?}",
            String::from_utf8_lossy(line)
        );
        assert!(denied.iter().all(|l| l["tenant"] == "alice"));
    }
    // A locator longer than a frame is a protocol violation.
    s.create_refused(
        "longer.img",
        b"LONGPARENT:40000",
        "exceeds the 65536-byte limit",
    );
}

#[test]
fn hostile_worker_passing_fds_is_refused_and_nothing_leaks() {
    let s = scene();
    s.create_refused("fds8.img", b"FDS:8", "sent file descriptors");
    s.create_refused("fds200.img", b"FDS:200", "file descriptors");
    s.create_refused("fds-payload.img", b"FDS:200:payload", "file descriptors");
    s.create_refused("fds1-payload.img", b"FDS:1:payload", "file descriptors");
    // Unasked frames full of fds while idle: caught at the next request;
    // none of them stays open in the broker after destroy.
    let pid = s.create_served("latefds.img", b"LATEFDS:50:8");
    s.sent_unasked(pid);
    let err = s.h.fails(&ALICE, &["stats", "-m", "1"]);
    assert!(err.contains("unsolicited"), "{err}");
    s.dead_then_destroyed(pid);
    // And when the next request is the destroy itself.
    let pid = s.create_served("latefds2.img", b"LATEFDS:50:8");
    s.sent_unasked(pid);
    s.h.ok(&ALICE, &["destroy", "-m", "1"]);
    assert!(eventually(Duration::from_secs(5), || !alive(pid)));
    s.alice_left_nothing();
    s.others_unharmed();
}

#[test]
fn hostile_worker_killed_for_a_violation_is_respawned_and_killed_again() {
    let s = scene_with(true);
    let pid = s.create_served("late-stats.img", b"LATE:Stats");
    s.sent_unasked(pid);
    let err = s.h.fails(&ALICE, &["stats", "-m", "1"]);
    assert!(err.contains("unsolicited"), "{err}");
    assert_eq!(s.audited("unsolicited"), pid);
    // Replaced by a fresh worker on the same device, which reopens the
    // same image and misbehaves the same way.
    let rows = || -> serde_json::Value {
        serde_json::from_str(&s.h.ok(&ALICE, &["list", "--json"])).unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = rows();
            r[0]["restarts"] == 1 && r[0]["state"] == 0 && r[0]["pid"] != pid
        }),
        "{}",
        rows()
    );
    let second = rows()[0]["pid"].as_u64().unwrap() as u32;
    s.sent_unasked(second);
    let err = s.h.fails(&ALICE, &["stats", "-m", "1"]);
    assert!(err.contains("unsolicited"), "{err}");
    assert_eq!(s.audited("unsolicited"), second);
    assert!(s
        .h
        .audit_lines()
        .iter()
        .any(|l| l["event"] == "worker_respawn" && l["rule"] == "respawn"));
    s.others_unharmed();
    // Whatever state the respawns reached, destroy clears it.
    assert!(eventually(Duration::from_secs(10), || {
        s.h.ctl(&ALICE, &["destroy", "-m", "1"]).status.success()
    }));
    s.alice_left_nothing();
    s.others_unharmed();
}
