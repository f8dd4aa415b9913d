//! The soak's ublk leg (the FUSE + loop and NBD legs are `tests/soak.rs`):
//! create/destroy cycles on a `frontend = "ublk"` broker, raw and VHD
//! images, a 4 KiB O_DIRECT round trip through each ublk block device, then
//! the same census before and after. Inside nestvm (software emulation) the
//! default is a bounded 30 cycles; `TAPJAIL_SOAK_CYCLES` (which
//! `.ci/nestvm-tests` passes into the VM; `.ci/soak --ublk` sets it to
//! 1000) runs the full count.

use crate::soak::{cycles, direct_round_trip, Census};
use crate::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Cycles before the "before" census (lazily made broker state).
const WARM_UP: u64 = 5;
/// The broker's RSS growth allowed after warm-up (as tests/soak.rs).
const RSS_GROWTH_BOUND_KIB: u64 = 512;

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn soak_ublk_create_destroy_cycles_leak_nothing() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "no /dev/ublk-control: this test runs inside nestvm (.ci/nestvm-tests)"
    );
    let total = cycles(30);
    let h = Harness::start(Options {
        frontend: "ublk",
        tenants: vec![ALICE],
        // Under software emulation on a loaded host a worker's first
        // start (a debug binary paged in over 9p) can take over 10 s.
        worker_timeout_secs: 60,
        ..Options::default()
    });
    let raw = h.raw_image("alice", "soak.img", 1 << 20);
    let vhd = h.vhd_image("alice", "soak.vhd", 4);
    let cycle = |i: u64| {
        let spec = if i.is_multiple_of(2) {
            format!("aio:{}", raw.display())
        } else {
            format!("vhd:{}", vhd.display())
        };
        let dev = PathBuf::from(h.ok(&ALICE, &["create", "-a", &spec]).trim());
        direct_round_trip(&dev, (i % 64) * 4096, i)
            .unwrap_or_else(|e| panic!("cycle {i}: {e}\n{}", h.broker_log()));
        h.ok(&ALICE, &["destroy", "-m", "0"]);
        assert!(!dev.exists(), "cycle {i}: {} left", dev.display());
    };
    for i in 0..WARM_UP {
        cycle(i);
    }
    let before = Census::take(&h, None);
    let t0 = std::time::Instant::now();
    let mut midway = None;
    for i in WARM_UP..WARM_UP + total {
        cycle(i);
        let done = i + 1 - WARM_UP;
        // Progress (a full run takes an hour or more under emulation)
        // and the midway census, which tells growth that settles from a
        // leak that keeps growing.
        if done.is_multiple_of(100) {
            eprintln!(
                "soak: ublk {done}/{total} cycles, {:.0} s",
                t0.elapsed().as_secs_f64()
            );
        }
        if done == total / 2 {
            midway = Some(Census::take(&h, None));
        }
    }
    let took = t0.elapsed();
    let settled = eventually(Duration::from_secs(30), || {
        Census::take(&h, None).leaks_since(&before).is_empty()
    });
    let after = Census::take(&h, None);
    eprintln!("soak: ublk before {before}");
    if let Some(m) = &midway {
        eprintln!("soak: ublk midway {m}");
    }
    eprintln!("soak: ublk after  {after}");
    eprintln!(
        "soak: ublk {total} cycles, {:.1} ms per cycle; rss growth after warm-up {} KiB",
        took.as_secs_f64() * 1000.0 / total as f64,
        after.rss_kib as i64 - before.rss_kib as i64
    );
    assert!(
        settled,
        "ublk: leaked after {total} cycles: {:?}\n{}",
        after.leaks_since(&before),
        h.broker_log()
    );
    assert_eq!((after.workers, after.zombies, after.ublk_chars), (0, 0, 0));
    let growth = after.rss_kib.saturating_sub(before.rss_kib);
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "ublk: broker RSS grew {growth} KiB over {total} cycles: {before} -> {after}"
    );
    assert_eq!(h.ok(&ALICE, &["list"]), "");
}
