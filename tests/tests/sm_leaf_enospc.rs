//! A leaf with a file secondary (`open -a vhd:LEAF -2 vhd:VDI`) running
//! out of space, end to end (real tap-broker, confined tapdisk, FUSE +
//! loop): the leaf lives on a size-capped tmpfs, so its block allocations
//! really fail with ENOSPC. Every guest write must still succeed and read
//! back, the disk must go on with the VDI alone (`failed-over`), a
//! respawned tapdisk must not serve the retired leaf's stale sectors, and
//! the VDI must hold every write. Needs root, /dev/fuse and loop devices.

use std::path::Path;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, is_root, pattern, require};

mod sm_leaf_common;
use sm_leaf_common::*;

#[test]
fn a_full_leaf_is_retired_and_the_vdi_serves_every_write() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(require(
        is_root(),
        "root (loop devices, FUSE mounts, tmpfs, tenant uids)",
    ) && require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE],
        ..Options::default()
    });
    let fs = Tmpfs::mount(&h.root(ALICE.name), "64m");
    let gold = h.vhd_image(ALICE.name, "gold.vhd", SIZE_MIB);
    let mut gold_data = pattern(SIZE / 2, 31);
    vhd_write(&gold, 0, &gold_data);
    gold_data.resize(SIZE, 0);
    // The VDI: gold plus an earlier MiB, every block allocated (it never
    // grows, so only the leaf can run out of space).
    let vdi = h.root(ALICE.name).join("vdi.vhd");
    h.vhd_snapshot(&vdi, &gold);
    let mut vdi_data = gold_data.clone();
    vdi_data[5 * MIB..6 * MIB].copy_from_slice(&pattern(MIB, 77));
    vhd_write(&vdi, 0, &vdi_data);
    let leaf = h.root(ALICE.name).join("leaf.vhd");
    h.vhd_snapshot(&leaf, &gold);

    let d = h.sm_attach(&ALICE);
    let (la, va) = (
        format!("vhd:{}", leaf.display()),
        format!("vhd:{}", vdi.display()),
    );
    h.ok(
        &ALICE,
        &["open", "-p", &d.pid, "-m", &d.minor, "-a", &la, "-2", &va],
    );
    // tmpfs files are sparse: room for about 1 MiB of the leaf's data.
    fs.cap(1 << 20);

    let mut model = Model::new(vdi_data.clone());
    let state = |h: &Harness| stats(h, &ALICE, &d.minor)["mirror"]["state"].clone();
    let mut piece = 0;
    while state(&h) == "mirroring" {
        assert!(piece < 64, "the leaf never ran out of space");
        let data = pattern(256 << 10, 100 + piece as u64);
        write_dev(&d.dev, &mut model, piece * (256 << 10), &data);
        piece += 1;
    }
    assert!(piece > 1, "the leaf took writes before it was full");
    let s = stats(&h, &ALICE, &d.minor);
    assert_eq!(s["mirror"]["state"].as_str(), Some("failed-over"), "{s}");
    assert!(
        s["mirror"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("out of space")),
        "{s}"
    );
    assert!(read_all(&d.dev) == model.data, "every write reads back");
    // Over what the leaf took before it was full: only the VDI has this.
    write_dev(&d.dev, &mut model, 0, &pattern(256 << 10, 99));
    let mut rng = Rng(0xe05c);
    random_io(&d.dev, &mut model, &mut rng, 60);

    // A respawned tapdisk opens the retired (emptied) leaf again and
    // reads through it to the VDI.
    kill_worker_and_await_respawn(&h, &ALICE, &d.minor);
    assert!(
        read_all(&d.dev) == model.data,
        "after the respawn: no stale leaf sector"
    );
    random_io(&d.dev, &mut model, &mut rng, 30);
    assert!(read_all(&d.dev) == model.data, "after more writes");

    sm_close(&h, &ALICE, &d.minor);
    vhd_check(&vdi);
    vhd_check(&leaf);
    assert!(vhd_read(&vdi) == model.data, "the VDI holds every write");
    drop(fs);
}

/// A tenant with two image roots, `big` and `small` (where the tmpfs
/// goes): a standby VDI must have room when the leaf has none.
const DAVE: TenantSpec = TenantSpec {
    name: "dave",
    uid: 4646,
    gid: 4646,
    writable: true,
    max_disks: 2,
    admin: false,
};

/// SM's scratch mode, `open -a vhd:LEAF -2 vhd:VDI -s` (SM adds `-e A`,
/// which changes nothing here): the VDI is neither read nor written
/// until the leaf is full; then it is put in front of the leaf and takes
/// every write (`failed-over`). Nothing the guest wrote is lost, before or
/// after, also across a respawn.
#[test]
fn a_full_leaf_fails_over_to_its_standby_vdi() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(require(
        is_root(),
        "root (loop devices, FUSE mounts, tmpfs, tenant uids)",
    ) && require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return;
    }
    let roots = tempfile::Builder::new()
        .prefix("tapjail-dave-")
        .tempdir()
        .unwrap();
    let (big, small) = (roots.path().join("big"), roots.path().join("small"));
    for d in [roots.path(), &big, &small] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        extra: format!(
            "[[tenant]]\nname = \"dave\"\nuids = [{}]\nimage_roots = [{big:?}, {small:?}]\n\
             writable = true\nmax_disks = 2\n",
            DAVE.uid
        ),
        ..Options::default()
    });
    let fs = Tmpfs::mount(&small, "64m");
    std::fs::set_permissions(&small, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let own = |p: &Path| std::os::unix::fs::chown(p, Some(DAVE.uid), Some(DAVE.gid)).unwrap();
    let gold = big.join("gold.vhd");
    run_tapctl(&[
        "vhd",
        "create",
        "-n",
        gold.to_str().unwrap(),
        "-s",
        &SIZE_MIB.to_string(),
    ]);
    own(&gold);
    let mut gold_data = pattern(SIZE / 2, 31);
    vhd_write(&gold, 0, &gold_data);
    gold_data.resize(SIZE, 0);
    // A scratch VM's VDI: reset, so an empty child of gold.
    let vdi = big.join("vdi.vhd");
    h.vhd_snapshot(&vdi, &gold);
    own(&vdi);
    let vdi_file = std::fs::read(&vdi).unwrap();
    let leaf = small.join("leaf.vhd");
    h.vhd_snapshot(&leaf, &gold);
    own(&leaf);
    let d = h.sm_attach(&DAVE);
    let (la, va) = (
        format!("vhd:{}", leaf.display()),
        format!("vhd:{}", vdi.display()),
    );
    h.ok(
        &DAVE,
        &[
            "open", "-p", &d.pid, "-m", &d.minor, "-a", &la, "-2", &va, "-s",
        ],
    );
    fs.cap(1 << 20);

    let mut model = Model::new(gold_data.clone());
    let state = |h: &Harness| stats(h, &DAVE, &d.minor)["mirror"]["state"].clone();
    assert_eq!(state(&h), "standby");
    write_dev(&d.dev, &mut model, 0, &pattern(256 << 10, 50));
    assert!(
        std::fs::read(&vdi).unwrap() == vdi_file,
        "a standby VDI is not written"
    );
    let mut piece = 1;
    while state(&h) == "standby" {
        assert!(piece < 64, "the leaf never ran out of space");
        let data = pattern(256 << 10, 100 + piece as u64);
        write_dev(&d.dev, &mut model, piece * (256 << 10), &data);
        piece += 1;
    }
    assert_eq!(state(&h), "failed-over");
    assert!(read_all(&d.dev) == model.data, "leaf and VDI together");
    // Over what the leaf holds: the VDI in front serves it.
    write_dev(&d.dev, &mut model, 0, &pattern(256 << 10, 99));
    let mut rng = Rng(0x5c7a);
    random_io(&d.dev, &mut model, &mut rng, 40);

    // A respawned tapdisk finds data in the standby VDI: it has taken
    // over, so it goes in front of the leaf again.
    kill_worker_and_await_respawn(&h, &DAVE, &d.minor);
    assert_eq!(state(&h), "failed-over");
    assert!(read_all(&d.dev) == model.data, "after the respawn");
    sm_close(&h, &DAVE, &d.minor);
    vhd_check(&vdi);
    drop(fs);
}
