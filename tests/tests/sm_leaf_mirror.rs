//! SM's IntelliCache leaf call in normal mode, end to end: a real
//! tap-broker (`frontend = "fuse"`), real confined tapdisks and loop
//! devices. A serves `gold.vhdcache` (`open -r`); the VM's disk is opened
//! exactly as SM's `_setup_cache` does, `open -a vhd:LEAF -r -e A -2
//! vhd:VDI`. The guest's writes must land in the local leaf and in the
//! shared VDI, reads must go leaf → VDI → cache → gold and fill the leaf
//! (never the VDI), a worker SIGKILL must lose nothing, and A's cache
//! must stay untouched. Needs root,
//! /dev/fuse and loop devices.

use std::fs;
use std::path::Path;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, is_root, pattern, require};

mod sm_leaf_common;
use sm_leaf_common::*;

#[test]
fn sm_leaf_call_mirrors_guest_writes_into_the_shared_vdi_and_reads_through_it() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(require(is_root(), "root (loop devices, FUSE mounts, tenant uids)")
        && require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE, BOB],
        tenant_lines: alice_lines(),
        ..Options::default()
    });
    let sr = sr(&h);
    let a = open_cache_minor(&h, &sr);
    let cache_before = fs::read(&sr.cache).unwrap();

    let b = h.sm_attach(&ALICE);
    h.ok(&ALICE, &strs(&leaf_args(&b, &sr, &a, false)));
    let uri = format!("vhd:{}", sr.vdi.display());

    // Before any write: the VDI's earlier MiB shows through the leaf.
    let mut model = Model::new(sr.vdi_data.clone());
    assert!(
        read_all(&b.dev) == model.data,
        "leaf over VDI over cache over gold"
    );
    let s = stats(&h, &ALICE, &b.minor);
    assert_eq!(s["mirror"]["uri"].as_str(), Some(uri.as_str()), "{s}");
    assert_eq!(s["mirror"]["state"].as_str(), Some("mirroring"), "{s}");
    assert_eq!(
        s["images"][1]["name"].as_str(),
        Some(uri.as_str()),
        "the secondary sits right below the leaf: {s}"
    );
    assert!(
        s["images"][1]["hits"][0].as_u64().unwrap() >= 2048,
        "the earlier MiB was read from the VDI: {s}"
    );
    // -r on the leaf: what the read brought up from below was written
    // back into the leaf (blktap's leaf-mode lcache).
    assert!(
        s["read_cache"]["filled"].as_u64().unwrap_or(0) >= (SIZE / 512) as u64,
        "every sector read from below filled the leaf: {s}"
    );
    assert_eq!(
        s["images"][1]["hits"][1].as_u64(),
        Some(0),
        "fills never go to the VDI (blktap's skip_mirror): {s}"
    );
    let s2 = {
        assert!(read_all(&b.dev) == model.data, "read again");
        stats(&h, &ALICE, &b.minor)
    };
    assert!(
        s2["images"][0]["hits"][0].as_u64().unwrap() >= (SIZE / 512) as u64,
        "the second read came from the leaf: {s2}"
    );
    assert_eq!(
        s2["images"][1]["hits"][0], s["images"][1]["hits"][0],
        "and none of it from the VDI: {s2}"
    );
    let row = entry(&h, &ALICE, &b.minor);
    assert_eq!(row["mirror"]["uri"].as_str(), Some(uri.as_str()), "{row}");
    assert_eq!(row["mirror"]["mode"].as_str(), Some("mirror"), "{row}");
    assert!(
        h.audit_lines().iter().any(|l| {
            let t = l.to_string();
            t.contains("-2 vhd:") && t.contains("mirroring") && t.contains("leaf-mode lcache")
        }),
        "the leaf call is audited with its secondary and -r's meaning"
    );

    // Random I/O, a worker SIGKILL, more random I/O.
    let mut rng = Rng(0x5eed_1eaf);
    random_io(&b.dev, &mut model, &mut rng, 120);
    kill_worker_and_await_respawn(&h, &ALICE, &b.minor);
    assert!(read_all(&b.dev) == model.data, "after the respawn");
    let s = stats(&h, &ALICE, &b.minor);
    assert_eq!(
        s["mirror"]["state"].as_str(),
        Some("mirroring"),
        "the respawned tapdisk mirrors again: {s}"
    );
    random_io(&b.dev, &mut model, &mut rng, 120);
    write_dev(&b.dev, &mut model, SIZE - MIB, &pattern(MIB, 5));
    assert!(read_all(&b.dev) == model.data, "after the second run");

    sm_close(&h, &ALICE, &b.minor);
    // Offline: the VDI holds exactly the guest's writes over gold, the
    // leaf the same over the cache; both check clean; A's cache file was
    // never written by the leaf's tapdisk.
    vhd_check(&sr.vdi);
    vhd_check(&sr.leaf);
    assert!(
        vhd_read(&sr.vdi) == model.writes_over(&sr.vdi_data),
        "the shared VDI holds exactly the guest's writes over what it held"
    );
    assert!(
        vhd_read(&sr.leaf) == model.data,
        "the local leaf holds the guest's writes and the read-through data"
    );
    assert!(
        fs::read(&sr.cache).unwrap() == cache_before,
        "the cache minor's file is untouched by the leaf"
    );
    sm_close(&h, &ALICE, &a.minor);
}
