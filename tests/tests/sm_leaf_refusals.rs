//! A file secondary (`-2 vhd:PATH`) is opened like any writable image of
//! the tenant, or not at all: a secondary outside her roots, reached
//! through a symlink, or another tenant's file is refused with a clear
//! message, audited, and nothing is opened (the minor serves nothing).
//! Real tap-broker, FUSE + loop; needs root and /dev/fuse.

use std::path::Path;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, is_root, require};

mod sm_leaf_common;
use sm_leaf_common::*;

#[test]
fn secondaries_outside_the_tenants_own_files_are_refused_audited_and_nothing_opens() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(require(is_root(), "root (loop devices, FUSE mounts, tenant uids)")
        && require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE, BOB],
        ..Options::default()
    });
    let leaf = h.vhd_image(ALICE.name, "leaf.vhd", SIZE_MIB);
    let la = format!("vhd:{}", leaf.display());
    // A file of the right size in each place she may not write.
    let outside = h.dir.path().join("outside.vhd");
    std::fs::copy(&leaf, &outside).unwrap();
    std::os::unix::fs::chown(&outside, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    let bobs = h.vhd_image(BOB.name, "vdi.vhd", SIZE_MIB);
    let own = h.vhd_image(ALICE.name, "vdi.vhd", SIZE_MIB);
    let link = h.root(ALICE.name).join("link.vhd");
    std::os::unix::fs::symlink(&own, &link).unwrap();
    let before = std::fs::read(&own).unwrap();

    let d = h.sm_attach(&ALICE);
    for (secondary, rule, says) in [
        (
            &outside,
            "outside-roots",
            "outside tenant alice's image roots",
        ),
        (&bobs, "outside-roots", "outside tenant alice's image roots"),
        (&link, "broker-check", "link.vhd"),
        // Its own leaf: the writer lock the broker holds refuses it first.
        (&leaf, "broker-check", "in use"),
    ] {
        let sa = format!("vhd:{}", secondary.display());
        let audited = h.audit_lines().len();
        let e = h.fails(
            &ALICE,
            &["open", "-p", &d.pid, "-m", &d.minor, "-a", &la, "-2", &sa],
        );
        assert!(e.contains(says), "{}: {e}", secondary.display());
        let lines = h.audit_lines();
        assert!(
            lines[audited..]
                .iter()
                .any(|l| l["rule"].as_str() == Some(rule)),
            "{}: refused by {rule} and audited: {:?}",
            secondary.display(),
            &lines[audited..]
        );
        let row = entry(&h, &ALICE, &d.minor);
        assert!(
            row["image"].is_null() || row["args"].is_null(),
            "nothing opened on the minor: {row}"
        );
    }
    assert!(
        std::fs::read(&own).unwrap() == before,
        "the symlink's target was never written"
    );
    // Her own file opens: the refusals were about the secondaries only.
    let oa = format!("vhd:{}", own.display());
    h.ok(
        &ALICE,
        &["open", "-p", &d.pid, "-m", &d.minor, "-a", &la, "-2", &oa],
    );
    h.ok(
        &ALICE,
        &["close", "-p", &d.pid, "-m", &d.minor, "-t", "120"],
    );
}
