//! The tenant matrix: every cross-tenant request is denied and audited,
//! `list` shows only one's own, limits hold, strangers get nothing.

use crate::*;
use std::os::unix::process::CommandExt;
use std::time::Duration;

fn create(h: &Harness, t: &TenantSpec, file: &str, ro: bool) -> (String, String) {
    let img = h.raw_image(t.name, file, 1 << 20);
    let spec = format!("aio:{}", img.display());
    let mut args = vec!["create", "-a", &spec];
    if ro {
        args.push("-R");
    }
    h.ok(t, &args);
    let rows: serde_json::Value = serde_json::from_str(&h.ok(t, &["list", "--json"])).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == img.to_str().unwrap())
        .expect("created disk listed");
    (row["minor"].to_string(), row["pid"].to_string())
}

fn denials(h: &Harness, uid: u32) -> Vec<serde_json::Value> {
    h.audit_lines()
        .into_iter()
        .filter(|l| l["decision"] == "deny" && l["peer"]["uid"] == uid)
        .collect()
}

#[test]
fn tenants_cross_tenant_requests_are_denied_audited_and_change_nothing() {
    let h = Harness::start(Options::default());
    let (am, ap) = create(&h, &ALICE, "a.img", false);
    let (bm, bp) = create(&h, &BOB, "b.img", false);
    // bob also has a spare, unattached worker.
    let spare = h.ok(&BOB, &["spawn"]).trim().to_string();
    let alice_list = h.ok(&ALICE, &["list"]);
    let bob_img = h.root("bob").join("b.img");
    let alice_img = h.root("alice").join("a.img");
    let bob_spec = format!("aio:{}", bob_img.display());
    let alice_spec = format!("aio:{}", alice_img.display());

    let before = denials(&h, BOB.uid).len();
    let attempts: Vec<Vec<&str>> = vec![
        vec!["free", "-m", &am],
        vec!["attach", "-m", &am, "-p", &spare],
        vec!["detach", "-m", &am, "-p", &ap],
        vec!["detach", "-m", &am],
        vec!["open", "-m", &am, "-p", &ap, "-a", &bob_spec],
        vec!["close", "-m", &am, "-p", &ap],
        vec!["close", "-m", &am, "-f"],
        vec!["destroy", "-m", &am, "-p", &ap],
        vec!["destroy", "-m", &am],
        vec!["pause", "-m", &am],
        vec!["unpause", "-m", &am],
        vec!["unpause", "-m", &am, "-a", &bob_spec],
        vec!["stats", "-m", &am],
        vec!["stats", "-m", &am, "-p", &ap],
        vec!["allocate", "-m", &am],
        // Own minor, alice's worker.
        vec!["stats", "-m", &bm, "-p", &ap],
        vec!["close", "-m", &bm, "-p", &ap],
        // alice's image on bob's own minor.
        vec!["create", "-a", &alice_spec],
    ];
    for args in &attempts {
        let err = h.fails(&BOB, args);
        assert!(
            err.contains("does not belong to tenant bob")
                || err.contains("outside tenant bob's image roots"),
            "{args:?}: {err}"
        );
    }
    let d = denials(&h, BOB.uid);
    assert_eq!(d.len() - before, attempts.len(), "every denial is audited");
    for l in &d[before..] {
        assert_eq!(l["tenant"], "bob");
        assert!(
            ["foreign-minor", "foreign-worker", "outside-roots"]
                .contains(&l["rule"].as_str().unwrap()),
            "{l}"
        );
        assert!(l["request"].is_object());
        assert!(l["prev"].as_str().unwrap().len() == 64);
    }
    // Nothing changed for alice, and each sees only their own.
    assert_eq!(h.ok(&ALICE, &["list"]), alice_list);
    let bob_list = h.ok(&BOB, &["list"]);
    assert!(!bob_list.contains(&format!("minor={am} ")), "{bob_list}");
    assert!(
        bob_list.contains(&format!("pid={bp} minor={bm}")),
        "{bob_list}"
    );
    assert!(bob_list.contains(&format!("pid={spare}\n")), "{bob_list}");
    assert_eq!(h.ok(&BOB, &["list", "-m", &am]), "");
    assert_eq!(h.ok(&BOB, &["list", "-p", &ap]), "");
    // The admin tenant (root, because the policy says so) sees all.
    let all = h.ok(&ROOT, &["list"]);
    assert!(
        all.contains(&format!("pid={ap}")) && all.contains(&format!("pid={bp}")),
        "{all}"
    );
    // ...and may stop anyone's disk, but never open on it.
    assert!(h
        .fails(&ROOT, &["unpause", "-m", &am, "-a", &bob_spec])
        .contains("does not belong"));
    h.ok(&ROOT, &["destroy", "-m", &bm]);
    h.ok(&ALICE, &["destroy", "-m", &am]);
    // bob ends his spare worker the blktap way: attach it, detach it.
    let m = h.ok(&BOB, &["allocate"]);
    let m = m.trim().rsplit("tapdev").next().unwrap().to_string();
    h.ok(&BOB, &["attach", "-m", &m, "-p", &spare]);
    h.ok(&BOB, &["detach", "-m", &m, "-p", &spare]);
    h.ok(&BOB, &["free", "-m", &m]);
    assert_eq!(h.ok(&ROOT, &["list"]), "");
}

#[test]
fn tenants_stranger_is_refused_everything() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    let spec = format!("aio:{}", img.display());
    for args in [
        vec!["list"],
        vec!["allocate"],
        vec!["spawn"],
        vec!["create", "-a", &spec],
        vec!["free", "-m", "0"],
        vec!["stats", "-m", "0"],
    ] {
        let out = h.ctl_as(NOBODY.0, NOBODY.1, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("matches no tenant"), "{args:?}: {err}");
    }
    let lines = denials(&h, NOBODY.0);
    assert_eq!(
        lines.len(),
        6,
        "one audited denial per connection (at Hello)"
    );
    assert!(lines
        .iter()
        .all(|l| l["rule"] == "no-tenant" && l.get("tenant").is_none()));
    assert_eq!(h.ok(&ROOT, &["list"]), "");
}

#[test]
fn tenants_stranger_flood_is_counted_not_written_line_by_line() {
    let mut h = Harness::start(Options::default());
    // 400 connections, each a Hello from a uid that matches no tenant.
    let out = std::process::Command::new(bin("fuzz-client"))
        .args([h.socket.to_str().unwrap(), "1", "400", "hello"])
        .uid(NOBODY.0)
        .gid(NOBODY.1)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", h.broker_log());
    // Lines in full: its Hellos' denials, and refusals at the connection
    // limit (a connection just answered may still hold its slot).
    let full = |h: &Harness| {
        denials(h, NOBODY.0)
            .into_iter()
            .filter(|l| l["event"] == "request")
            .count() as u64
    };
    // A handful in full (one window's budget, two if the flood straddled
    // a window), not 400 fsync'd lines.
    let written = full(&h);
    assert!((10..=20).contains(&written), "{written} lines in full");
    // Everyone else is served meanwhile.
    h.ok(&ALICE, &["list"]);
    // The count is written once the window ends, without any new event.
    let summaries = |h: &Harness| -> Vec<serde_json::Value> {
        h.audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "denials_suppressed")
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(25), || !summaries(&h).is_empty()),
        "no summary line\n{}",
        h.broker_log()
    );
    h.stop();
    let s = summaries(&h);
    let counted: u64 = s
        .iter()
        .map(|l| l["request"]["suppressed"].as_u64().unwrap())
        .sum();
    assert_eq!(counted + full(&h), 400, "every denial accounted for: {s:?}");
    assert!(
        s.iter().all(|l| l["peer"]["uid"] == NOBODY.0
            && l["rule"] == "rate-limit"
            && l["request"]["kinds"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k == "no-tenant" || k == "max-clients")
            && l["reason"]
                .as_str()
                .unwrap()
                .contains("further denied request(s) of kinds {")),
        "{s:?}"
    );
    let out = h.ctl(&ROOT, &["audit", "verify", h.audit.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn tenants_limits_and_read_only_are_enforced() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("carol", "c.img", 1 << 20);
    let spec = format!("aio:{}", img.display());
    assert!(h
        .fails(&CAROL, &["create", "-a", &spec])
        .contains("read-only only"));
    h.ok(&CAROL, &["create", "-a", &spec, "-R"]);
    h.ok(&CAROL, &["create", "-a", &spec, "-R"]);
    assert!(h
        .fails(&CAROL, &["create", "-a", &spec, "-R"])
        .contains("max_disks = 2"));
    assert!(h.fails(&CAROL, &["spawn"]).contains("max_disks = 2"));
    assert!(h.fails(&CAROL, &["allocate"]).contains("max_disks = 2"));
    // A writable tenant may not open one file twice for writing.
    let a = h.raw_image("alice", "a.img", 1 << 20);
    let aspec = format!("aio:{}", a.display());
    h.ok(&ALICE, &["create", "-a", &aspec]);
    assert!(h
        .fails(&ALICE, &["create", "-a", &aspec])
        .contains("already open"));
    assert!(h
        .fails(&ALICE, &["create", "-a", &aspec, "-R"])
        .contains("already open for writing"));
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    assert_eq!(
        rows.as_array().unwrap().len(),
        3,
        "failed creates left nothing: {rows}"
    );
    for m in ["0", "1", "2"] {
        h.ok(&ROOT, &["destroy", "-m", m]);
    }
}

#[test]
fn tenants_file_names_cannot_drive_the_admins_terminal() {
    let h = Harness::start(Options::default());
    // alice names her image so that, printed raw, it would retitle the
    // admin's terminal, clear it, and forge a row of bob's.
    let evil = "x\x1b]0;owned\x07\x1b[2J\n    6666    1    0        vhd b.img";
    let img = h.raw_image("alice", evil, 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let (ok, tty) = h.ctl_tty(&ROOT, &["list"]);
    assert!(ok, "{tty}");
    let plain = h.ok(&ROOT, &["list"]);
    for out in [&tty, &plain] {
        assert_eq!(out.lines().count(), 1, "{out:?}");
        assert!(!out.trim_end().chars().any(|c| c.is_control()), "{out:?}");
        assert!(
            out.contains("x\\x1b]0;owned\\x07\\x1b[2J\\x0a    6666"),
            "{out}"
        );
    }
    // An error that quotes the name is escaped too.
    let err = h.fails(&ROOT, &["detach", "-m", "0"]);
    assert!(!err.trim_end().chars().any(|c| c.is_control()), "{err:?}");
    // JSON keeps the name exactly (serde escapes it).
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    assert_eq!(rows[0]["file"], img.to_str().unwrap());
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}
