//! `tap-ctl audit verify` across rotated files, and `tap-ctl policy check`
//! on worker uids that someone else owns.

use std::path::Path;
use std::process::Command;
use tapjail_common::audit::{AuditLog, Entry, Event, Reopened, Verdict};

fn ctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.env_remove("TAPJAIL_SOCKET");
    c
}

fn entry(n: u32) -> Entry {
    Entry {
        event: Event::Request,
        peer: None,
        tenant: Some("alice".into()),
        request: None,
        decision: Verdict::Allow,
        rule: "owner".into(),
        reason: format!("request {n}"),
        outcome: None,
    }
}

fn verify(files: &[&Path]) -> (Option<i32>, String, String) {
    let out = ctl()
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_audit_verify_follows_the_chain_across_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("audit.jsonl");
    let one = dir.path().join("audit.jsonl.1");
    let two = dir.path().join("audit.jsonl.2");
    let mut log = AuditLog::open(&live).unwrap();
    log.append(&entry(0)).unwrap();
    std::fs::rename(&live, &two).unwrap();
    assert!(matches!(log.reopen().unwrap(), Reopened::Rotated { .. }));
    log.append(&entry(1)).unwrap();
    std::fs::rename(&live, &one).unwrap();
    assert!(matches!(log.reopen().unwrap(), Reopened::Rotated { .. }));
    log.append(&entry(2)).unwrap();
    drop(log);

    let (code, out, err) = verify(&[&two, &one, &live]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 file(s): one unbroken chain"), "{out}");
    // One file alone: intact, and it says what it continues unchecked.
    let (code, out, _) = verify(&[&live]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&format!("continues {}", one.display())) && out.contains("not checked"),
        "{out}"
    );
    // A missing middle file, and the wrong order: the break is named.
    let (code, _, err) = verify(&[&two, &live]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{}: chain broken at line 1", live.display()))
            && err.contains(&format!("the last line of {} hashes to", two.display())),
        "{err}"
    );
    let (code, _, err) = verify(&[&one, &two, &live]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{}: chain broken at line 1", two.display())),
        "{err}"
    );
    // A line altered in an old file is found in that file.
    let text = std::fs::read_to_string(&one).unwrap();
    std::fs::write(&one, text.replace("request 1", "request X")).unwrap();
    let (code, _, err) = verify(&[&two, &one, &live]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{}: chain broken at line 1", live.display())),
        "{err}"
    );
}

#[test]
fn cli_policy_check_refuses_worker_uids_someone_else_owns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("subuid"),
        "alice:100000:65536\nbob:165536:65536\ncarol:231072:65536\ndave:296608:65536\n",
    )
    .unwrap();
    std::fs::write(
        d.join("subgid"),
        "alice:100000:65536\nbob:165536:65536\ncarol:231072:65536\ndave:296608:65536\n",
    )
    .unwrap();
    std::fs::write(
        d.join("passwd"),
        "root:x:0:0::/root:/bin/sh\nbuild:x:300500:100::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(d.join("group"), "root:x:0:\n").unwrap();
    let pol = d.join("p.toml");
    let write = |range: &str| {
        std::fs::write(
            &pol,
            format!(
                "worker_uids = {range}\nsubuid_file = {:?}\nsubgid_file = {:?}\npasswd_file = {:?}\ngroup_file = {:?}\n\
                 [[tenant]]\nname = \"a\"\nuids = [1]\n",
                d.join("subuid"),
                d.join("subgid"),
                d.join("passwd"),
                d.join("group")
            ),
        )
        .unwrap();
    };
    write("[300000, 300999]");
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        format!(
            "{}:4: subordinate uids 296608..=362143 of \"dave\"",
            d.join("subuid").display()
        ),
        format!(
            "{}:4: subordinate gids 296608..=362143 of \"dave\"",
            d.join("subgid").display()
        ),
        format!("{}:2: uid 300500 of \"build\"", d.join("passwd").display()),
    ] {
        assert!(err.contains(&want), "{want}\n{err}");
    }
    write("[2000000000, 2000000999]");
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_policy_check_default_worker_uids_are_free_on_this_host() {
    // No worker_uids and no id-file keys: the default range against this
    // machine's /etc files.
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("p.toml");
    std::fs::write(&pol, "[[tenant]]\nname = \"a\"\nuids = [1]\n").unwrap();
    let out = ctl().args(["policy", "check"]).arg(&pol).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker uids 2000000000..=2000000999"));
}
