//! A disk with a file secondary (`open -a vhd:LEAF -2 vhd:VDI`) across a
//! broker crash: the restarted broker adopts the disk with its secondary
//! from the minor's record, so the tapdisk it respawns later mirrors into
//! the VDI again; no guest write is left out of the VDI. Real tap-broker,
//! FUSE + loop; needs root and /dev/fuse.

use tapjail_tests::*;
use tapjail_testsupport::pattern;

mod sm_leaf_common;
use sm_leaf_common::*;

#[test]
fn a_restarted_broker_respawns_the_tapdisk_with_its_file_secondary() {
    let Some((_turn, mut h)) = alice_broker() else {
        return;
    };
    // The leaf straight over gold: no cache minor (the layout with one is
    // sm_leaf_adopt.rs).
    let sr = sr(&h);
    let b = h.sm_attach(&ALICE);
    let leaf = sr.dir.join("leaf.vhd");
    h.vhd_snapshot(&leaf, &sr.gold);
    let (la, va) = (
        format!("vhd:{}", leaf.display()),
        format!("vhd:{}", sr.vdi.display()),
    );
    h.ok(
        &ALICE,
        &["open", "-p", &b.pid, "-m", &b.minor, "-a", &la, "-2", &va],
    );
    let mut model = Model::new(sr.vdi_data.clone());
    write_dev(&b.dev, &mut model, 0, &pattern(MIB, 1));

    h.crash();
    h.launch();
    let uri = format!("vhd:{}", sr.vdi.display());
    assert_eq!(
        entry(&h, &ALICE, &b.minor)["mirror"]["uri"].as_str(),
        Some(uri.as_str()),
        "the adopted disk still mirrors"
    );
    kill_worker_and_await_respawn(&h, &ALICE, &b.minor);
    let s = stats(&h, &ALICE, &b.minor);
    assert_eq!(s["mirror"]["uri"].as_str(), Some(uri.as_str()), "{s}");
    assert_eq!(s["mirror"]["state"].as_str(), Some("mirroring"), "{s}");
    write_dev(&b.dev, &mut model, 3 * MIB, &pattern(MIB, 2));
    assert!(read_all(&b.dev) == model.data);

    sm_close(&h, &ALICE, &b.minor);
    vhd_check(&sr.vdi);
    assert!(
        vhd_read(&sr.vdi) == model.writes_over(&sr.vdi_data),
        "the VDI holds the writes made before and after the restart"
    );
}
