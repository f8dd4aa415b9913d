//! XAPI's storage manager on tapjail: `xapi/sm_harness.py` makes the
//! tap-ctl calls SM's `drivers/blktap2.py` makes, in SM's orders, and
//! parses the answers by SM's rules, against a real tap-broker with FUSE +
//! loop devices. Needs root, python3, /dev/fuse and loop devices.

use std::process::Command;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, have, is_root, require};

#[test]
fn sm_harness_attach_detach_pause_and_error_paths_parse_and_back_out_as_sm_expects() {
    if !require(is_root(), "root (FUSE mounts, loop devices)")
        || !require(have("python3"), "python3 (runs SM's call sequences)")
    {
        return;
    }
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE],
        ..Options::default()
    });
    // Another tenant's read-only gold master: SM (as root) must not be
    // able to base a clone on it with -e.
    let theirs = h.vhd_image("alice", "gold.vhd", 8);
    let dev = h.ok(
        &ALICE,
        &["create", "-R", "-a", &format!("vhd:{}", theirs.display())],
    );
    let foreign = dev
        .trim()
        .rsplit_once("tapdev")
        .map(|(_, n)| n.to_string())
        .expect("create printed a tapdevN path");

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("xapi/sm_harness.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("SM_TAPCTL", bin("tap-ctl"))
        .env("TAPJAIL_SOCKET", &h.socket)
        .env("SM_DEVDIR", &h.devices)
        .env("SM_IMAGES", h.root("ops"))
        .env("SM_FOREIGN_MINOR", &foreign)
        .output()
        .expect("run python3");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "SM harness: {}\n{said}\n--- broker log ---\n{}",
        out.status,
        h.broker_log()
    );
    assert!(said.contains("all calls behaved as SM expects"), "{said}");

    // Every refusal is on record: the flags not built with the request
    // that named them, the cross-tenant -e as a denial by its rule; and no
    // key byte anywhere in the log.
    let lines = h.audit_lines();
    let text = std::fs::read_to_string(&h.audit).unwrap();
    for flag in ["-r (", "-2 (", "-s (", "-E ("] {
        assert!(
            lines.iter().any(|l| l["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("not supported") && o.contains(flag))),
            "no audited refusal of {flag}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["rule"] == "foreign-parent" && l["decision"] == "deny"),
        "the cross-tenant -e is not on record"
    );
    // -C on open and -c on unpause are carried out, and on record.
    for log in ["cbt.cbtlog", "clone1.cbtlog"] {
        assert!(
            lines.iter().any(|l| l["request"].to_string().contains(log)
                && l["outcome"]
                    .as_str()
                    .is_some_and(|o| !o.contains("not supported"))),
            "{log} is not on record"
        );
    }
    assert!(
        !text.contains("KKKKKKKK"),
        "key bytes reached the audit log"
    );
    h.ok(&ALICE, &["destroy", "-m", &foreign]);
}
