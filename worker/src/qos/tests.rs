use super::*;
use std::sync::Arc;
use tapjail_common::qos::Rate;

const MS: u64 = 1_000_000;

fn clocked() -> (Throttle, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(5_000 * 1_000 * MS));
    let n = now.clone();
    (Throttle::with_clock(Box::new(move || n.load(Relaxed))), now)
}

fn limits(knob: Knob, per_sec: u64, burst: u64) -> IoLimits {
    let mut l = IoLimits::default();
    l.set(knob, Some(Rate { per_sec, burst }));
    l
}

fn memfd() -> OwnedFd {
    let f = tempfile::tempfile().unwrap();
    f.set_len(4096).unwrap();
    f.into()
}

#[test]
fn unlimited_throttle_never_delays_nor_counts() {
    let (t, _) = clocked();
    for _ in 0..1000 {
        assert_eq!(t.take(Dir::Write, 1 << 20), 0);
    }
    assert!(t.ready(Dir::Read, 1 << 30));
    assert_eq!(t.stats().paced, [0, 0]);
}

#[test]
fn write_iops_limit_paces_writes_only() {
    let (t, _) = clocked();
    t.set(limits(Knob::WriteIops, 50, 5), IoLimits::default(), None)
        .unwrap();
    let waits: Vec<u64> = (0..25).map(|_| t.take(Dir::Write, 4096)).collect();
    assert_eq!(&waits[..5], &[0; 5], "the burst");
    assert_eq!(waits[5], 20 * MS);
    assert_eq!(waits[24], 20 * 20 * MS);
    for _ in 0..100 {
        assert_eq!(t.take(Dir::Read, 1 << 20), 0, "reads are not limited");
    }
    let s = t.stats();
    assert_eq!(s.paced, [0, 25]);
    assert_eq!(s.delayed, [0, 20]);
    assert_eq!(s.max_delay_us[1], 400_000);
    // The schedule spans (n - burst) / rate, which is what e2e tests check.
    assert_eq!(s.last_release_us[1] - s.first_release_us[1], 400_000);
    assert_eq!(s.disk.write_iops.unwrap().per_sec, 50);
}

#[test]
fn bytes_and_iops_limits_combine_and_the_later_slot_wins() {
    let (t, now) = clocked();
    let mut l = limits(Knob::ReadIops, 1000, 1);
    l.set(
        Knob::ReadBps,
        Some(Rate {
            per_sec: 1 << 20,
            burst: 64 << 10,
        }),
    );
    t.set(l, IoLimits::default(), None).unwrap();
    assert_eq!(t.take(Dir::Read, 64 << 10), 0);
    // Bytes are spent: 64 KiB at 1 MiB/s is 62.5 ms; iops alone says 1 ms.
    assert_eq!(t.take(Dir::Read, 64 << 10), 62_500_000);
    assert!(!t.ready(Dir::Read, 512));
    now.fetch_add(200 * MS, Relaxed);
    assert!(t.ready(Dir::Read, 512));
}

#[test]
fn tenant_limit_is_shared_by_workers_mapping_one_bucket() {
    let fd = memfd();
    let (a, now) = clocked();
    let n = now.clone();
    let b = Throttle::with_clock(Box::new(move || n.load(Relaxed)));
    let tenant = limits(Knob::WriteIops, 100, 10);
    a.set(IoLimits::default(), tenant, Some(fd.try_clone().unwrap()))
        .unwrap();
    b.set(IoLimits::default(), tenant, Some(fd)).unwrap();
    // Ten at once between them, then one per 10 ms for the pair.
    let mut waits = Vec::new();
    for i in 0..30 {
        let t = if i % 2 == 0 { &a } else { &b };
        waits.push(t.take(Dir::Write, 4096));
    }
    assert_eq!(waits.iter().filter(|w| **w == 0).count(), 10);
    assert_eq!(*waits.last().unwrap(), 20 * 10 * MS);
    assert_eq!(a.stats().paced[1] + b.stats().paced[1], 30);
    // A worker of another tenant has its own file: untouched budget.
    let (c, _) = clocked();
    c.set(IoLimits::default(), tenant, Some(memfd())).unwrap();
    assert_eq!(c.take(Dir::Write, 4096), 0);
}

#[test]
fn a_new_bucket_file_replaces_the_old_and_the_same_one_is_kept() {
    let (t, _) = clocked();
    let tenant = limits(Knob::WriteIops, 100, 1);
    let old = memfd();
    t.set(IoLimits::default(), tenant, Some(old.try_clone().unwrap()))
        .unwrap();
    assert_eq!(t.take(Dir::Write, 1), 0);
    // The same file again (every change passes it): the debt is kept.
    t.set(IoLimits::default(), tenant, Some(old.try_clone().unwrap()))
        .unwrap();
    assert_eq!(t.take(Dir::Write, 1), 10 * MS);
    // A restarted broker's new file: the worker joins it.
    let new = memfd();
    t.set(IoLimits::default(), tenant, Some(new.try_clone().unwrap()))
        .unwrap();
    assert_eq!(t.take(Dir::Write, 1), 0, "a fresh bucket");
    let (other, _) = clocked();
    other.set(IoLimits::default(), tenant, Some(new)).unwrap();
    assert_eq!(
        other.take(Dir::Write, 1),
        10 * MS,
        "shared with the new file"
    );
}

#[test]
fn tenant_limits_without_a_bucket_file_are_refused() {
    let (t, _) = clocked();
    let e = t
        .set(IoLimits::default(), limits(Knob::ReadBps, 1000, 100), None)
        .unwrap_err();
    assert!(matches!(e, ThrottleError::NoTenantBucket), "{e}");
    let e = t
        .set(limits(Knob::ReadBps, 0, 1), IoLimits::default(), None)
        .unwrap_err();
    assert!(e.to_string().contains("read_bps"), "{e}");
    assert_eq!(t.take(Dir::Read, 4096), 0, "nothing was applied");
}

#[test]
fn raising_a_limit_at_runtime_forgives_the_old_debt() {
    let (t, _) = clocked();
    t.set(limits(Knob::WriteIops, 1, 1), IoLimits::default(), None)
        .unwrap();
    for _ in 0..100 {
        t.take(Dir::Write, 4096);
    }
    assert_eq!(t.take(Dir::Write, 4096), 100_000 * MS);
    t.set(limits(Knob::WriteIops, 1000, 1), IoLimits::default(), None)
        .unwrap();
    assert_eq!(t.take(Dir::Write, 4096), MS);
    t.set(IoLimits::default(), IoLimits::default(), None)
        .unwrap();
    assert_eq!(t.take(Dir::Write, 4096), 0, "limit removed");
}

#[test]
fn interrupt_ends_a_long_sleep() {
    let t = Arc::new(Throttle::default());
    t.set(limits(Knob::WriteIops, 1, 1), IoLimits::default(), None)
        .unwrap();
    t.take(Dir::Write, 1);
    t.take(Dir::Write, 1);
    let sleeper = {
        let t = t.clone();
        std::thread::spawn(move || t.admit(Dir::Write, 1))
    };
    // The sleeper's debt is 2 s at least; it may not have started sleeping
    // when the first interrupt comes, so interrupt until it is done.
    while !sleeper.is_finished() {
        t.interrupt();
        std::thread::yield_now();
    }
    sleeper.join().unwrap();
    assert_eq!(t.stats().delayed[1], 2);
}
