//! SM's full IntelliCache layout across a broker crash: read cache minor A
//! (`open -a vhd:CACHE -r`) and the VM's leaf B (`open -a vhd:LEAF -r -e A
//! -2 vhd:VDI`). The restarted broker must adopt both (B's read claim on
//! the cache beside A's writer claim comes back from B's record), keep I/O
//! on B matching the model, and respawn either tapdisk as before the
//! crash: A still a read cache, B still reading the cache and mirroring
//! into the VDI. Real tap-broker, FUSE + loop; needs root and /dev/fuse.

use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::pattern;

mod sm_leaf_common;
use sm_leaf_common::*;

fn adopt_lines(h: &Harness, rule: &str) -> Vec<String> {
    h.audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "adopt" && l["rule"] == rule)
        .map(|l| l.to_string())
        .collect()
}

/// SIGKILL `minor`'s tapdisk and wait for a new one serving it (a
/// respawn may take more than one try: a uid the killed worker held can
/// linger a moment, and the broker then tries another).
fn kill_and_respawn(h: &Harness, minor: &str) {
    kill_worker_and_await_respawn(h, &ALICE, minor);
    assert!(
        eventually(Duration::from_secs(30), || stats_ok(h, minor)),
        "minor {minor} answers no stats after its respawn\n{}",
        h.broker_log()
    );
}

/// Whether `minor`'s tapdisk answers `stats` (it serves).
fn stats_ok(h: &Harness, minor: &str) -> bool {
    let Some(pid) = entry(h, &ALICE, minor)["pid"].as_u64() else {
        return false;
    };
    h.ctl(&ALICE, &["stats", "-p", &pid.to_string(), "-m", minor])
        .status
        .success()
}

#[test]
fn a_restarted_broker_adopts_the_read_cache_and_its_leaf_and_respawns_both() {
    let Some((_turn, mut h)) = alice_broker() else {
        return;
    };
    let sr = sr(&h);
    let a = open_cache_minor(&h, &sr);
    let b = h.sm_attach(&ALICE);
    h.ok(&ALICE, &strs(&leaf_args(&b, &sr, &a, false)));
    let uri = format!("vhd:{}", sr.vdi.display());
    let mut model = Model::new(sr.vdi_data.clone());
    let mut rng = Rng(0xada7_cace);
    // Random I/O only: most of the leaf stays unfilled, for the fills
    // checked after the respawns.
    random_io(&b.dev, &mut model, &mut rng, 60);

    h.crash();
    h.launch();
    let minors = adopt_lines(&h, "adopt-minor");
    assert!(
        adopt_lines(&h, "adopt-minor-refused").is_empty(),
        "no minor refused: {:?}\n{}",
        adopt_lines(&h, "adopt-minor-refused"),
        h.broker_log()
    );
    for m in [&a.minor, &b.minor] {
        assert!(
            minors
                .iter()
                .any(|l| l.contains(&format!("adopted minor {m} serving"))),
            "minor {m} adopted: {minors:?}"
        );
    }
    assert_eq!(
        entry(&h, &ALICE, &b.minor)["mirror"]["uri"].as_str(),
        Some(uri.as_str()),
        "the adopted leaf still mirrors"
    );
    assert!(
        read_dev(&b.dev, 0, MIB) == model.data[..MIB],
        "after the restart"
    );
    random_io(&b.dev, &mut model, &mut rng, 60);

    // B's tapdisk respawned by the new broker: it reopens the cache
    // read-only beside A's writer, fills its leaf, mirrors into the VDI.
    kill_and_respawn(&h, &b.minor);
    let s = stats(&h, &ALICE, &b.minor);
    assert_eq!(s["mirror"]["state"].as_str(), Some("mirroring"), "{s}");
    assert!(read_all(&b.dev) == model.data, "after B's respawn");
    let s = stats(&h, &ALICE, &b.minor);
    assert!(
        s["read_cache"]["filled"].as_u64().unwrap_or(0) > 0,
        "the respawned leaf is still filled from below (leaf mode): {s}"
    );
    assert_eq!(
        s["images"][1]["hits"][1].as_u64(),
        Some(0),
        "fills never go to the VDI: {s}"
    );
    random_io(&b.dev, &mut model, &mut rng, 40);

    // A's tapdisk respawned by the new broker: still a read cache.
    kill_and_respawn(&h, &a.minor);
    let sa = stats(&h, &ALICE, &a.minor);
    assert!(
        sa["read_cache"].is_object(),
        "the respawned cache minor is still a read cache: {sa}"
    );
    assert!(
        read_all(&a.dev) == sr.gold_data,
        "the respawned cache minor serves gold"
    );
    write_dev(&b.dev, &mut model, 2 * MIB, &pattern(MIB, 9));
    assert!(read_all(&b.dev) == model.data, "after A's respawn");
    // B's next respawn still pairs with the respawned A.
    kill_and_respawn(&h, &b.minor);
    assert!(read_all(&b.dev) == model.data, "after B's second respawn");

    sm_close(&h, &ALICE, &b.minor);
    sm_close(&h, &ALICE, &a.minor);
    vhd_check(&sr.vdi);
    vhd_check(&sr.leaf);
    vhd_check(&sr.cache);
    assert!(
        vhd_read(&sr.vdi) == model.writes_over(&sr.vdi_data),
        "the VDI holds the guest's writes made before and after the restart"
    );
    assert!(
        vhd_read(&sr.leaf) == model.data,
        "the local leaf holds the guest's writes and the read-through data"
    );
}

/// A read cache closed while its clone stays open unpairs the clone, and
/// its record says so: a restarted broker adopts the clone unpaired (not
/// refused), and the cache file still cannot be opened for writing while
/// the clone reads it.
#[test]
fn a_clone_whose_read_cache_closed_is_adopted_unpaired() {
    let Some((_turn, mut h)) = alice_broker() else {
        return;
    };
    let sr = sr(&h);
    let a = open_cache_minor(&h, &sr);
    let b = h.sm_attach(&ALICE);
    h.ok(&ALICE, &strs(&leaf_args(&b, &sr, &a, false)));
    let mut model = Model::new(sr.vdi_data.clone());
    write_dev(&b.dev, &mut model, 0, &pattern(MIB, 3));
    // Kept: the reopen below names the tapdisk that served A.
    let apid = entry(&h, &ALICE, &a.minor)["pid"]
        .as_u64()
        .unwrap()
        .to_string();
    h.ok(&ALICE, &["close", "-p", &apid, "-m", &a.minor, "-t", "120"]);

    h.crash();
    h.launch();
    let refused = adopt_lines(&h, "adopt-minor-refused");
    assert!(refused.is_empty(), "{refused:?}\n{}", h.broker_log());
    assert!(
        adopt_lines(&h, "adopt-minor")
            .iter()
            .any(|l| l.contains(&format!("adopted minor {} serving", b.minor))),
        "the clone adopted"
    );
    assert!(
        read_all(&b.dev) == model.data,
        "the clone after the restart"
    );
    // Unpaired: the cache file is not written beside the clone's reads.
    let ca = format!("vhd:{}", sr.cache.display());
    let err = h.fails(
        &ALICE,
        &["open", "-p", &apid, "-m", &a.minor, "-a", &ca, "-r"],
    );
    assert!(err.contains("already open"), "{err}");
    sm_close(&h, &ALICE, &b.minor);
    vhd_check(&sr.vdi);
    assert!(vhd_read(&sr.vdi) == model.writes_over(&sr.vdi_data));
}
