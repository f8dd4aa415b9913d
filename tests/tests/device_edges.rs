//! Edges of a served disk that only a real device shows, through FUSE +
//! loop end to end (real broker, confined workers, tap-ctl, loop device):
//! the respawn limit, a full image filesystem (real ENOSPC), sparse images
//! past 2 TiB written near their end, and large VHD blocks and large I/Os.
//! Needs root, /dev/fuse, loop devices and qemu-img.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tapjail_tests::*;
use tapjail_testsupport::{
    fuse_loop_turn, is_root, pattern, require, spawn_with_tid, wait_blocked_in_kernel, Aligned,
    Tmpfs,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The FUSE + loop lock, or `None` (skip) when not root.
fn turn() -> Option<std::fs::File> {
    if !require(is_root(), "FUSE mounts and loop devices need root") {
        return None;
    }
    Some(fuse_loop_turn().expect("the FUSE + loop test lock"))
}

fn harness(respawn: bool, extra: &str) -> Harness {
    Harness::start(Options {
        frontend: "fuse",
        respawn,
        tenants: vec![ROOT],
        extra: extra.to_string(),
        ..Options::default()
    })
}

fn create(h: &Harness, spec: &str) -> PathBuf {
    PathBuf::from(h.ok(&ROOT, &["create", "-a", spec]).trim())
}

fn list(h: &Harness) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).expect("list --json")
}

fn direct(dev: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()))
}

/// Write `data` at `off` with O_DIRECT and make it durable (fdatasync):
/// acknowledged only when both succeed.
fn write_durably(f: &std::fs::File, data: &[u8], off: u64) -> std::io::Result<()> {
    let mut b = Aligned::new(data.len());
    b.buf().copy_from_slice(data);
    f.write_all_at(b.buf(), off)?;
    f.sync_data()
}

fn read_direct(f: &std::fs::File, len: usize, off: u64) -> Vec<u8> {
    let mut b = Aligned::new(len);
    f.read_exact_at(b.buf(), off)
        .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
    b.buf().to_vec()
}

fn vhd_check(vhd: &Path) {
    let out = Command::new(bin("tap-ctl"))
        .args(["vhd", "check", "-n"])
        .arg(vhd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tap-ctl vhd check {}: {}{}",
        vhd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vhd_create(path: &Path, mib: u64, block: u64) {
    let out = Command::new(bin("tap-ctl"))
        .args(["vhd", "create", "-n"])
        .arg(path)
        .args(["-s", &mib.to_string(), "--block-size", &block.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `len` bytes of the image at `off`, read offline by qemu-img (format
/// `vpc` or `raw`, under a raw node that cuts out the range) into a
/// scratch file.
fn qemu_read(img: &Path, format: &str, off: u64, len: u64) -> Vec<u8> {
    let scratch = tempfile::NamedTempFile::new().expect("scratch file");
    let file = if format == "raw" {
        format!("file.driver=file,file.filename={}", img.display())
    } else {
        format!(
            "file.driver={format},file.file.driver=file,file.file.filename={}",
            img.display()
        )
    };
    let out = Command::new("qemu-img")
        .args(["convert", "--image-opts"])
        .arg(format!("driver=raw,offset={off},size={len},{file}"))
        .args(["-O", "raw"])
        .arg(scratch.path())
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(scratch.path()).unwrap()
}

#[test]
fn fuse_respawn_limit_hit_leaves_the_disk_dead_listed_and_io_failing() {
    let Some(_turn) = turn() else { return };
    let h = harness(true, "max_restarts_per_minute = 1");
    let img = h.raw_image(ROOT.name, "limit.img", 4 * MIB);
    let dev = create(&h, &format!("aio:{}", img.display()));
    write_durably(&direct(&dev), &pattern(4096, 1), 0).unwrap();
    let first = list(&h)[0]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on a worker pid the broker reported.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(30), || {
            let r = list(&h);
            r[0]["restarts"] == 1 && r[0]["state"] == 0 && r[0]["pid"] != first
        }),
        "the first death was not replaced: {:?}\n{}",
        list(&h),
        h.broker_log()
    );
    assert_eq!(read_direct(&direct(&dev), 4096, 0), pattern(4096, 1));
    let second = list(&h)[0]["pid"].as_u64().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(second as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(30), || list(&h)[0]["state"]
            .as_u64()
            .is_some_and(|s| s & 1 != 0)),
        "two deaths within a minute with a limit of 1 left it not DEAD: {:?}",
        list(&h)
    );
    let row = list(&h).remove(0);
    assert_eq!(row["restarts"], 1, "{row}");
    assert!(
        h.ok(&ROOT, &["list"]).contains("state=0x1 "),
        "{}",
        h.ok(&ROOT, &["list"])
    );
    let dead = h
        .audit_lines()
        .into_iter()
        .find(|l| l["rule"] == "respawn-limit")
        .expect("the limit is audited");
    assert!(
        dead["reason"]
            .as_str()
            .is_some_and(|r| r.contains("2 worker deaths within a minute (limit 1)")),
        "{dead}"
    );
    match direct_read_outcome(&dev, Duration::from_secs(30)) {
        None => panic!("a read of a disk left dead hangs"),
        Some(ok) => assert!(!ok, "a read of a disk left dead succeeded"),
    }
    assert!(
        eventually(Duration::from_secs(10), || workers_of(h.broker_pid())
            .is_empty()),
        "a worker runs for a dead disk: {:?}",
        workers_of(h.broker_pid())
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    assert!(list(&h).is_empty());
}

/// Fill the image's filesystem through the device: the write that finds
/// no room fails (EIO or ENOSPC) rather than hanging or being dropped,
/// everything acknowledged before reads back, and the disk is not killed:
/// it keeps serving reads.
fn enospc_through_the_device(kind: &str) {
    let Some(_turn) = turn() else { return };
    let h = harness(false, "");
    // The whole image root is an 8 MiB filesystem; the image claims 32.
    let _fs = Tmpfs::mount(&h.root(ROOT.name), 8 * MIB);
    let img = h.root(ROOT.name).join(format!("full.{kind}"));
    if kind == "vhd" {
        vhd_create(&img, 32, 2 * MIB);
    } else {
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
    }
    let spec = format!(
        "{}:{}",
        if kind == "vhd" { "vhd" } else { "aio" },
        img.display()
    );
    let dev = create(&h, &spec);
    let f = direct(&dev);
    let mut acked = Vec::new();
    let mut failed = None;
    for chunk in 0..32u64 {
        let data = pattern(MIB as usize, chunk);
        match write_durably(&f, &data, chunk * MIB) {
            Ok(()) => acked.push((chunk, data)),
            Err(e) => {
                failed = Some((chunk, e));
                break;
            }
        }
    }
    let (at, e) =
        failed.unwrap_or_else(|| panic!("{kind}: 32 MiB were acknowledged on an 8 MiB filesystem"));
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOSPC)),
        "{kind}: chunk {at}: {e}"
    );
    assert!(!acked.is_empty(), "{kind}: not even the first MiB fit");
    // Nothing acknowledged is lost, and the disk still serves.
    let again = direct(&dev);
    for (chunk, data) in &acked {
        assert!(
            read_direct(&again, MIB as usize, chunk * MIB) == *data,
            "{kind}: acknowledged chunk {chunk} reads back differently"
        );
    }
    let row = list(&h).remove(0);
    assert_eq!(
        row["state"], 0,
        "{kind}: a full filesystem killed the disk: {row}"
    );
    // A later write that needs no room (over an acknowledged chunk) works.
    write_durably(&again, &pattern(MIB as usize, 99), 0)
        .unwrap_or_else(|e| panic!("{kind}: rewriting an allocated chunk: {e}"));
    assert_eq!(
        read_direct(&again, MIB as usize, 0),
        pattern(MIB as usize, 99)
    );
    drop((f, again));
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    if kind == "vhd" {
        vhd_check(&img);
        // Offline, qemu reads what the device acknowledged.
        for (chunk, data) in acked.iter().skip(1) {
            assert!(
                qemu_read(&img, "vpc", chunk * MIB, MIB) == *data,
                "vhd: chunk {chunk} differs offline"
            );
        }
    }
}

#[test]
fn fuse_enospc_raw_fails_the_write_keeps_acknowledged_data_and_serves() {
    enospc_through_the_device("raw");
}

#[test]
fn fuse_enospc_vhd_fails_the_write_keeps_acknowledged_data_and_stays_clean() {
    enospc_through_the_device("vhd");
}

/// Writes at the very end of a sparse image past 2 TiB (raw, 4 TiB) and
/// of a VHD of the largest size (2040 GiB, 4 MiB blocks): the device has
/// the full size, the bytes land where qemu reads them offline, and
/// nothing else is allocated.
#[test]
fn fuse_sparse_images_past_2tib_take_writes_at_their_end() {
    let Some(_turn) = turn() else { return };
    let h = harness(false, "");
    let raw = h.raw_image(ROOT.name, "big.img", 4096 * GIB);
    let vhd = h.root(ROOT.name).join("big.vhd");
    vhd_create(&vhd, 2040 * 1024, 8 * MIB);
    h.own(&vhd);
    for (spec, img, size, format) in [
        (format!("aio:{}", raw.display()), &raw, 4096 * GIB, "raw"),
        (format!("vhd:{}", vhd.display()), &vhd, 2040 * GIB, "vpc"),
    ] {
        let dev = create(&h, &spec);
        let out = Command::new("blockdev")
            .arg("--getsize64")
            .arg(&dev)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string(),
            "{format}: device size"
        );
        let f = direct(&dev);
        // The last MiB, and 8 KiB straddling a 32-bit sector count: 2^32
        // sectors (2 TiB) on the raw image, 2^31 on the VHD (whose largest
        // size is below 2 TiB).
        let tail = pattern(MIB as usize, size);
        write_durably(&f, &tail, size - MIB)
            .unwrap_or_else(|e| panic!("{format}: the last MiB: {e}\n{}", h.broker_log()));
        let mark = pattern(8192, 2);
        let mark_at = if format == "raw" {
            2048 * GIB
        } else {
            1024 * GIB
        } - 4096;
        write_durably(&f, &mark, mark_at)
            .unwrap_or_else(|e| panic!("{format}: 8 KiB at {mark_at}: {e}\n{}", h.broker_log()));
        assert!(read_direct(&f, 8192, mark_at) == mark, "{format}: the mark");
        assert!(
            read_direct(&f, MIB as usize, size - MIB) == tail,
            "{format}: the tail through the device"
        );
        // Past the end is refused, not wrapped around.
        let mut b = Aligned::new(4096);
        let past = f.write_at(b.buf(), size);
        assert!(
            !matches!(past, Ok(n) if n > 0),
            "{format}: a write past the end: {past:?}"
        );
        drop(f);
        h.ok(&ROOT, &["destroy", "-m", "0"]);
        assert!(
            qemu_read(img, format, size - MIB, MIB) == tail,
            "{format}: the tail offline"
        );
        assert!(
            qemu_read(img, format, mark_at, 8192) == mark,
            "{format}: the write across a 32-bit sector count, offline"
        );
        // Sparse: a few MiB of data, not terabytes.
        let used = std::fs::metadata(img).unwrap().blocks() * 512;
        assert!(used < 64 * MIB, "{format}: {used} bytes allocated");
    }
    vhd_check(&vhd);
}

/// VHDs with 512 KiB and 4 MiB blocks, and a raw image, written through
/// the device in 512 KiB, 4 MiB and 8 MiB I/Os that start mid-block and
/// cross block boundaries; read back through the device, and offline.
#[test]
fn fuse_large_blocks_and_large_ios_round_trip_through_the_device() {
    let Some(_turn) = turn() else { return };
    let h = harness(false, "");
    let raw = h.raw_image(ROOT.name, "io.img", 64 * MIB);
    let mut images = vec![("raw", raw.clone(), "raw", 0)];
    for block in [512 * KIB, 4 * MIB] {
        let p = h.root(ROOT.name).join(format!("b{}k.vhd", block / KIB));
        vhd_create(&p, 64, block);
        h.own(&p);
        images.push(("vhd", p, "vpc", block));
    }
    for (kind, img, format, block) in images {
        let spec = format!(
            "{}:{}",
            if kind == "vhd" { "vhd" } else { "aio" },
            img.display()
        );
        let dev = create(&h, &spec);
        let f = direct(&dev);
        let mut writes = Vec::new();
        let mut off = 4 * KIB + block / 2;
        for (i, len) in [512 * KIB, 4 * MIB, 8 * MIB, 512 * KIB, 4 * MIB]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len as usize, block + i as u64);
            write_durably(&f, &data, off)
                .unwrap_or_else(|e| panic!("{format} block {block}: {len} B at {off}: {e}"));
            writes.push((off, data));
            off += len + 12 * KIB;
        }
        let again = direct(&dev);
        for (off, data) in &writes {
            assert!(
                read_direct(&again, data.len(), *off) == *data,
                "{format} block {block}: {} B at {off} read back differently",
                data.len()
            );
        }
        drop((f, again));
        h.ok(&ROOT, &["destroy", "-m", "0"]);
        if kind == "vhd" {
            vhd_check(&img);
        }
        for (off, data) in &writes {
            assert!(
                qemu_read(&img, format, *off, data.len() as u64) == *data,
                "{format} block {block}: {} B at {off} differ offline",
                data.len()
            );
        }
    }
}

/// The largest VHD with the default 2 MiB blocks has a 4 MiB BAT. Under a
/// small locked-memory budget (this host's hard RLIMIT_MEMLOCK is 8 MiB
/// and the broker may not raise it) the worker cannot hold it: the create
/// must then fail saying so and what to do, not abort the worker on an
/// allocation ("peer closed the connection"); with room it must serve.
#[test]
fn fuse_largest_vhd_with_2mib_blocks_is_served_or_refused_clearly() {
    let Some(_turn) = turn() else { return };
    let h = harness(false, "");
    let vhd = h.root(ROOT.name).join("max.vhd");
    vhd_create(&vhd, 2040 * 1024, 2 * MIB);
    h.own(&vhd);
    let out = h.ctl(&ROOT, &["create", "-a", &format!("vhd:{}", vhd.display())]);
    if out.status.success() {
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let f = direct(&dev);
        let tail = pattern(MIB as usize, 3);
        write_durably(&f, &tail, 2040 * GIB - MIB).unwrap();
        assert!(read_direct(&f, MIB as usize, 2040 * GIB - MIB) == tail);
        drop(f);
        h.ok(&ROOT, &["destroy", "-m", "0"]);
        vhd_check(&vhd);
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        (err.contains("block allocation table (4080 KiB for 1044480 blocks) does not fit")
            || err.contains("max.vhd needs") && err.contains("KiB of locked memory"))
            && err.contains("worker_memlock_mib"),
        "{err}\n{}",
        h.broker_log()
    );
    assert!(list(&h).is_empty(), "the failed create left {:?}", list(&h));
}

/// A write to a paused disk parks in the kernel (the event the ublk tests
/// wait for, seen here on the host) and completes once it is unpaused,
/// landing in the image.
#[test]
fn fuse_write_to_a_paused_disk_waits_in_the_kernel_and_lands_after_unpause() {
    let Some(_turn) = turn() else { return };
    let h = harness(false, "");
    let img = h.raw_image(ROOT.name, "paused.img", 4 * MIB);
    let dev = create(&h, &format!("aio:{}", img.display()));
    h.ok(&ROOT, &["pause", "-m", "0"]);
    let state = list(&h)[0]["state"].as_u64().unwrap();
    assert!(state & 0x20 != 0, "not PAUSED: {state:#x}");
    let dev2 = dev.clone();
    let (writer, tid) =
        spawn_with_tid(move || write_durably(&direct(&dev2), &pattern(4096, 7), 8192));
    assert!(
        wait_blocked_in_kernel(tid, Duration::from_secs(30)),
        "the write did not wait while the disk is paused (finished: {})",
        writer.is_finished()
    );
    assert!(!writer.is_finished());
    h.ok(&ROOT, &["unpause", "-m", "0"]);
    writer
        .join()
        .unwrap()
        .expect("the held write completes after unpause");
    assert!(read_direct(&direct(&dev), 4096, 8192) == pattern(4096, 7));
    h.ok(&ROOT, &["destroy", "-m", "0"]);
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, 8192)
        .unwrap();
    assert!(got == pattern(4096, 7), "the write is not in the image");
}
