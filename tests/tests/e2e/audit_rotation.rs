//! logrotate and the audit log (issue 11 item 6): on SIGHUP the broker
//! reopens its log; the new file's first line (`rotated`) chains to the
//! last line of the renamed one and names it, and `tap-ctl audit verify
//! OLD NEW` checks the chain across both.

use crate::*;
use std::time::Duration;

fn hup(h: &Harness) {
    let pid = h.broker_pid() as i32;
    // SAFETY: kill(2) on the broker this test started; no memory involved.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

fn first_line(p: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(p).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

#[test]
fn audit_rotation_on_sighup_continues_the_chain_in_a_new_file() {
    let mut h = Harness::start(Options::default());
    h.ok(&ALICE, &["list"]);
    // SIGHUP without rotation: the same file goes on.
    hup(&h);
    assert!(
        eventually(Duration::from_secs(10), || h
            .broker_log()
            .contains("was not rotated")),
        "{}",
        h.broker_log()
    );
    h.ok(&ALICE, &["list"]);
    // logrotate's `create` way: rename, then SIGHUP.
    let old = h.audit.with_file_name("audit.jsonl.1");
    std::fs::rename(&h.audit, &old).unwrap();
    hup(&h);
    assert!(
        eventually(Duration::from_secs(10), || first_line(&h.audit)
            .is_some_and(|l| l["event"] == "rotated")),
        "no rotated line\n{}",
        h.broker_log()
    );
    let first = first_line(&h.audit).unwrap();
    assert_eq!(first["request"]["previous_file"], old.to_str().unwrap());
    h.ok(&ALICE, &["list"]);
    h.fails(&BOB, &["free", "-m", "0"]);
    h.stop();
    // Nothing after the rename went to the old file.
    let old_text = std::fs::read_to_string(&old).unwrap();
    assert!(!old_text.contains("broker_stop"), "{old_text}");
    let verify = |files: &[&std::path::Path]| {
        let mut args = vec!["audit", "verify"];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        h.ctl(&ROOT, &args)
    };
    let out = verify(&[&old, &h.audit]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 file(s): one unbroken chain"));
    // The wrong order is a break, named.
    let out = verify(&[&h.audit, &old]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: chain broken at line 1", old.display())),
        "{err}"
    );
}
