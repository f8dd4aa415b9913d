//! The soak: many create/destroy cycles through real brokers and tap-ctl,
//! alternating between a FUSE + loop broker and an NBD-socket broker, raw
//! and VHD images, with a little I/O through each device; then nothing may
//! be left that was not there before (see [`tapjail_tests::soak::Census`])
//! and the brokers' memory may not grow past a small bound after warm-up.
//! The ublk soak runs inside nestvm (`e2e/soak_ublk.rs`). `.ci/soak` runs
//! this with a chosen count and prints the census.
//!
//! Needs root, /dev/fuse, loop devices and qemu-io.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tapjail_tests::soak::{cycles, direct_round_trip, Census};
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, have, is_root, pattern, require};

/// Cycles before the "before" census: lazily made broker state (the audit
/// log's fd, thread pools, allocator arenas) exists by then.
const WARM_UP: u64 = 20;
/// How much a broker's RSS may grow from the end of warm-up to the end of
/// the soak. Measured growth over 1000 cycles on this host: see
/// bench/README.md ("soak"); a per-cycle leak of even 1 KiB exceeds it.
const RSS_GROWTH_BOUND_KIB: u64 = 512;

/// A broker under soak, with the raw image whose 4 KiB slots its cycles
/// write (slot -> the last cycle that wrote it and what it wrote, checked
/// at the end).
struct Side {
    h: Harness,
    tenant: TenantSpec,
    raw: PathBuf,
    vhd: PathBuf,
    last: BTreeMap<u64, (u64, Vec<u8>)>,
    secs: f64,
    n: u64,
}

const SLOTS: u64 = 64;

impl Side {
    fn new(frontend: &'static str, tenant: TenantSpec) -> Side {
        let h = Harness::start(Options {
            frontend,
            tenants: vec![tenant.clone()],
            ..Options::default()
        });
        let raw = h.raw_image(tenant.name, "soak.img", SLOTS * 4096);
        let vhd = h.vhd_image(tenant.name, "soak.vhd", 4);
        Side {
            h,
            tenant,
            raw,
            vhd,
            last: BTreeMap::new(),
            secs: 0.0,
            n: 0,
        }
    }

    /// One create, a 4 KiB write and read back, destroy.
    fn cycle(&mut self, i: u64) {
        let t0 = Instant::now();
        let raw = (i / 2).is_multiple_of(2);
        let spec = if raw {
            format!("aio:{}", self.raw.display())
        } else {
            format!("vhd:{}", self.vhd.display())
        };
        let dev = PathBuf::from(self.h.ok(&self.tenant, &["create", "-a", &spec]).trim());
        let slot = (i / 4) % SLOTS;
        if self.h.opts.frontend == "nbd" {
            qemu_io_round_trip(&dev, slot * 4096, i);
        } else {
            direct_round_trip(&dev, slot * 4096, i)
                .unwrap_or_else(|e| panic!("cycle {i}: {e}\n{}", self.h.broker_log()));
        }
        if raw {
            let want = if self.h.opts.frontend == "nbd" {
                vec![(i % 251) as u8; 4096]
            } else {
                pattern(4096, i)
            };
            self.last.insert(slot, (i, want));
        }
        self.h.ok(&self.tenant, &["destroy", "-m", "0"]);
        assert!(!dev.exists(), "cycle {i}: {} left", dev.display());
        self.secs += t0.elapsed().as_secs_f64();
        self.n += 1;
    }

    fn census(&self) -> Census {
        Census::take(&self.h, None)
    }

    /// Every raw-image slot holds its last cycle's write.
    fn check_image(&self) {
        let f = std::fs::File::open(&self.raw).unwrap();
        for (slot, (cycle, want)) in &self.last {
            let mut got = vec![0u8; 4096];
            f.read_exact_at(&mut got, slot * 4096).unwrap();
            assert!(
                got == *want,
                "{}: slot {slot} lost cycle {cycle}'s write",
                self.h.opts.frontend
            );
        }
    }
}

/// The NBD side's I/O: qemu-io writes 4 KiB of byte `i` at `off` on the
/// socket the tapdev link names and reads it back (`read -P` fails on a
/// mismatch).
fn qemu_io_round_trip(link: &Path, off: u64, i: u64) {
    let sock = std::fs::read_link(link).expect("tapdev link to the NBD socket");
    let byte = format!("{:#x}", i % 251);
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(format!(
            "nbd+unix:///{}?socket={}",
            link.file_name().unwrap().to_string_lossy(),
            sock.display()
        ))
        .args(["-c", &format!("write -P {byte} {off} 4k")])
        .args(["-c", &format!("read -P {byte} {off} 4k")])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("Pattern verification"),
        "cycle {i}: qemu-io on {}: {text}{}",
        sock.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn soak_thousand_cycles_over_fuse_and_nbd_leak_nothing() {
    if !require(is_root(), "the soak needs root (FUSE mounts, loop devices)")
        || !require(have("qemu-io"), "qemu-io (the NBD side's client)")
    {
        return;
    }
    let total = cycles(1000);
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let mut sides = [Side::new("fuse", ROOT), Side::new("nbd", ALICE)];
    for i in 0..WARM_UP * 2 {
        sides[(i % 2) as usize].cycle(i);
    }
    let before: Vec<Census> = sides.iter().map(Side::census).collect();
    let mut mid = before.clone();
    let t0 = Instant::now();
    for i in WARM_UP * 2..WARM_UP * 2 + total {
        sides[(i % 2) as usize].cycle(i);
        if i == WARM_UP * 2 + total / 2 {
            mid = sides.iter().map(Side::census).collect();
        }
    }
    let took = t0.elapsed();
    for (k, side) in sides.iter().enumerate() {
        let fe = side.h.opts.frontend;
        // Teardown finishes after destroy answers (a loop device's
        // autoclear, a worker's reaping): wait for the counts to settle.
        let settled = eventually(Duration::from_secs(15), || {
            side.census().leaks_since(&before[k]).is_empty()
        });
        let after = side.census();
        eprintln!("soak: {fe} before {}", before[k]);
        eprintln!("soak: {fe} mid    {}", mid[k]);
        eprintln!("soak: {fe} after  {}", after);
        eprintln!(
            "soak: {fe} {} cycles, {:.1} ms per cycle; rss growth after warm-up {} KiB, \
             pss {} KiB",
            side.n,
            side.secs * 1000.0 / side.n as f64,
            after.rss_kib as i64 - before[k].rss_kib as i64,
            after.pss_kib as i64 - before[k].pss_kib as i64
        );
        assert!(
            settled,
            "{fe}: leaked after {total} cycles: {:?}\n{}",
            after.leaks_since(&before[k]),
            side.h.broker_log()
        );
        assert_eq!(after.workers, 0, "{fe}: workers left");
        assert_eq!(after.zombies, 0, "{fe}: unreaped children");
        let growth = after.rss_kib.saturating_sub(before[k].rss_kib);
        assert!(
            growth <= RSS_GROWTH_BOUND_KIB,
            "{fe}: broker RSS grew {growth} KiB over {total} cycles (bound \
             {RSS_GROWTH_BOUND_KIB} KiB): before {}, mid {}, after {after}",
            before[k],
            mid[k]
        );
        side.check_image();
        assert_eq!(side.h.ok(&side.tenant, &["list"]), "");
    }
    eprintln!(
        "soak: {total} cycles in {:.1} s ({} per broker)",
        took.as_secs_f64(),
        total / 2
    );
}
