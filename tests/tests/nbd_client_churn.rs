//! Many short-lived NBD clients against one disk's worker, through a real
//! broker: each client connects, reads, and hangs up. The worker runs
//! under `mlockall` with a small RLIMIT_MEMLOCK, so locked memory a
//! connection leaves behind adds up until an allocation aborts the worker
//! (the disk dies). Its locked memory must stop growing after warm-up and
//! the disk must still serve. Needs root and qemu-io.

use std::path::Path;
use std::process::Command;
use tapjail_tests::*;
use tapjail_testsupport::{have, is_root, require};

/// Clients before the baseline: pools, buffers and allocator arenas the
/// first clients make lazily exist by then.
const WARM_UP: u64 = 8;
/// Rounds after the baseline (one or two clients each): at the reported
/// ~136 KiB per client, far past an 8 MiB limit.
const CLIENTS: u64 = 40;
/// How much VmLck may grow from the baseline to the end. One stray
/// connection stack plus its buffer is 176 KiB, so a per-client leak
/// shows after two clients.
const GROWTH_BOUND_KIB: u64 = 256;

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("worker {pid} gone: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// One client: connect, read 64 KiB and 1 MiB with qemu-io, check the
/// pattern, hang up; then copy the whole disk with `qemu-img convert`
/// (eight requests in flight).
fn client(link: &Path, i: u64, h: &Harness) {
    let sock = std::fs::read_link(link).expect("tapdev link to the NBD socket");
    let off = (i % 16) * 65536;
    let out = Command::new("timeout")
        .args(["20", "qemu-io", "-f", "raw", "-r"])
        .arg(format!(
            "nbd+unix:///{}?socket={}",
            link.file_name().unwrap().to_string_lossy(),
            sock.display()
        ))
        .args(["-c", &format!("read -P 0x5a {off} 64k")])
        .args(["-c", "read -P 0x5a 0 1M"])
        .args(["-c", "readv -P 0x5a 0 512k 512k"])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    let uri = format!(
        "nbd+unix:///{}?socket={}",
        link.file_name().unwrap().to_string_lossy(),
        sock.display()
    );
    let dst = std::env::temp_dir().join(format!("nbd-churn-{}-{i}", std::process::id()));
    let conv = Command::new("timeout")
        .args([
            "20", "qemu-img", "convert", "-f", "raw", "-O", "raw", "-m", "8", "-W",
        ])
        .arg(&uri)
        .arg(&dst)
        .output()
        .expect("qemu-img");
    let _ = std::fs::remove_file(&dst);
    assert!(
        conv.status.success(),
        "client {i}: qemu-img convert: {}\n{}",
        String::from_utf8_lossy(&conv.stderr),
        h.broker_log()
    );
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("Pattern verification"),
        "client {i}: qemu-io: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.broker_log()
    );
}

#[test]
fn nbd_short_lived_clients_leave_no_locked_memory_behind() {
    if !require(is_root(), "root") || !require(have("qemu-io"), "qemu-io") {
        return;
    }
    let h = Harness::start(Options::default());
    let img = h.raw_image(ALICE.name, "churn.img", 4 << 20);
    std::fs::write(&img, vec![0x5au8; 4 << 20]).unwrap();
    let dev = h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let dev = Path::new(dev.trim()).to_path_buf();
    let workers = workers_of(h.broker_pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    let pid = workers[0];
    for i in 0..WARM_UP {
        client(&dev, i, &h);
    }
    let (lck0, rss0) = (status_kib(pid, "VmLck"), status_kib(pid, "VmRSS"));
    for i in WARM_UP..WARM_UP + CLIENTS {
        // Every other round two clients at once (the fewest a worker
        // admits): their buffers interleave in the heap.
        std::thread::scope(|s| {
            for j in 0..1 + i % 2 {
                let (dev, h) = (&dev, &h);
                s.spawn(move || client(dev, i * 2 + j, h));
            }
        });
        assert!(
            alive(pid),
            "worker died after client {i}\n{}",
            h.broker_log()
        );
    }
    let (lck1, rss1) = (status_kib(pid, "VmLck"), status_kib(pid, "VmRSS"));
    eprintln!("VmLck {lck0} -> {lck1} KiB, VmRSS {rss0} -> {rss1} KiB over {CLIENTS} rounds");
    assert!(
        lck1 <= lck0 + GROWTH_BOUND_KIB,
        "locked memory grew {} KiB over {CLIENTS} rounds ({lck0} -> {lck1})",
        lck1 - lck0
    );
    assert!(
        rss1 <= rss0 + GROWTH_BOUND_KIB,
        "RSS grew {} KiB over {CLIENTS} rounds ({rss0} -> {rss1})",
        rss1 - rss0
    );
    // Still serves, from the same worker.
    client(&dev, 0, &h);
    assert_eq!(workers_of(h.broker_pid()), vec![pid]);
}
