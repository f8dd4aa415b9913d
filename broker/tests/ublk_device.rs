//! Functional tests against the real ublk driver: the broker's ublk
//! backend creates devices, the worker's ublk frontend serves them in a
//! child process (this test binary re-executed), and the tests do I/O on
//! `/dev/ublkbN`, kill the server and recover. The FUSE backend's kernel
//! tests are their sibling, `fuse_device.rs`.
//!
//! They need `ublk_drv`, which this host's kernel lacks, so they are
//! `#[ignore]`d in ordinary runs and run inside nestvm by
//! `.ci/nestvm-tests` (`--ignored`), which says so in its output.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapjail_broker::device::ublk::{available, UblkBackend, CONTROL_PATH};
use tapjail_broker::device::{DeviceBackend, DeviceError, Prepared};
use tapjail_common::frame;
use tapjail_common::proto::{FrontendKind, ImageKind};
use tapjail_common::worker_proto::{FromWorker, FrontendSpec, ToWorker};
use tapjail_testsupport::{
    spawn_with_tid, tasks_in_d_state, ublk_char_devices, wait_blocked_in_kernel, Aligned,
};
use tapjail_worker::disk::Disk;
use tapjail_worker::frontend::ublk::UblkFrontend;
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::{vhd, Image};

const CHILD_ENV: &str = "TAPJAIL_UBLK_TEST_CHILD";
/// Where the served char device and the readiness pipe land in the child.
const CHILD_CHAR_FD: i32 = 3;
const CHILD_READY_FD: i32 = 4;

/// The name libtest knows the child entry by (a top-level test of this
/// integration test binary).
fn child_test_name() -> String {
    "ublk_child_entry".into()
}

/// Entry point of the serving child; does nothing unless started by
/// [`spawn_server`] (the nestvm script skips it).
#[test]
#[ignore = "helper process entry, started by the other ublk tests"]
fn ublk_child_entry() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let code = match child_serve(&cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ublk test child: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn child_serve(cfg: &str) -> Result<(), String> {
    let mut parts = cfg.splitn(4, '\u{1f}');
    let image = parts.next().ok_or("no image")?;
    let ro = parts.next().ok_or("no ro")? == "1";
    let stop_on_eof = parts.next().ok_or("no stop")? == "1";
    let spec: Vec<u32> = parts
        .next()
        .ok_or("no spec")?
        .split(',')
        .map(|s| s.parse().map_err(|e| format!("{e}")))
        .collect::<Result<_, _>>()?;
    let [dev_id, nr_queues, queue_depth, max_io_bytes] = spec[..] else {
        return Err("bad spec".into());
    };
    let spec = FrontendSpec::Ublk {
        dev_id,
        nr_queues: nr_queues as u16,
        queue_depth: queue_depth as u16,
        max_io_bytes,
        recovering: false,
    };
    let img: Arc<dyn Image> = if image.ends_with(".vhd") {
        Arc::new(
            tapjail_ctl::files::open_vhd(std::path::Path::new(image), ro, Default::default())
                .map_err(|e| e.to_string())?,
        )
    } else {
        let file = OpenOptions::new()
            .read(true)
            .write(!ro)
            .open(image)
            .map_err(|e| format!("open {image}: {e}"))?;
        Arc::new(RawImage::open(Box::new(file), image, ro).map_err(|e| e.to_string())?)
    };
    let disk = Disk::new(img);
    // SAFETY: the parent placed the char device at this fd for us alone.
    let char_dev = unsafe { OwnedFd::from_raw_fd(CHILD_CHAR_FD) };
    // SAFETY: likewise for the write end of the readiness pipe.
    let mut ready = unsafe { File::from_raw_fd(CHILD_READY_FD) };
    let fe = UblkFrontend::new(char_dev, &spec).map_err(|e| e.to_string())?;
    let server = fe.launch(disk.clone()).map_err(|e| e.to_string())?;
    ready.write_all(b"R").map_err(|e| e.to_string())?;
    drop(ready);
    if stop_on_eof {
        // The parent closes our stdin once the device is started: the
        // event to stop on (not a timer racing its START_DEV).
        let stop = server.stopper();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop();
        });
    }
    server.wait().map_err(|e| e.to_string())?;
    disk.close().map_err(|e| e.to_string())
}

/// Start a serving child for `prepared` and wait until its queues are
/// attached. The broker's copy of the char device is closed here, as the
/// real broker does once the worker has it.
fn spawn_server(prepared: Prepared, image: &std::path::Path, ro: bool) -> Child {
    spawn_server_stopping(prepared, image, ro, false)
}

/// [`spawn_server`]; with `stop_on_eof` its server stops by itself, and
/// exits cleanly, once the parent closes the child's stdin (drop
/// `child.stdin`).
fn spawn_server_stopping(
    prepared: Prepared,
    image: &std::path::Path,
    ro: bool,
    stop_on_eof: bool,
) -> Child {
    let FrontendSpec::Ublk {
        dev_id,
        nr_queues,
        queue_depth,
        max_io_bytes,
        ..
    } = prepared.spec
    else {
        panic!("not a ublk spec");
    };
    let mut fds = prepared.fds;
    assert_eq!(fds.len(), 1, "ublk hands over exactly the char device");
    let char_dev = fds.remove(0);
    let (mut rd, wr) = pipe();
    let char_raw = char_dev.as_raw_fd();
    let wr_raw = wr.as_raw_fd();
    let cfg = format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{dev_id},{nr_queues},{queue_depth},{max_io_bytes}",
        image.display(),
        if ro { "1" } else { "0" },
        if stop_on_eof { "1" } else { "0" }
    );
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        "--exact",
        &child_test_name(),
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, cfg)
    .stdin(if stop_on_eof {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    // SAFETY: the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on fds that are open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            // Move the pipe first in case it sits on fd 3.
            let w = libc::fcntl(wr_raw, libc::F_DUPFD_CLOEXEC, 10);
            let c = libc::fcntl(char_raw, libc::F_DUPFD_CLOEXEC, 10);
            if w < 0
                || c < 0
                || libc::dup2(c, CHILD_CHAR_FD) < 0
                || libc::dup2(w, CHILD_READY_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn the serving child");
    // The worker has it now: the broker must not keep a copy, or the
    // driver would refuse START_USER_RECOVERY after the worker dies.
    drop(char_dev);
    drop(wr);
    let mut b = [0u8; 1];
    let n = rd.read(&mut b).expect("read readiness");
    assert_eq!(n, 1, "the serving child exited before its queues attached");
    child
}

fn pipe() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both fds are open and ours alone.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL the server");
    let st = child.wait().expect("reap the server");
    assert!(!st.success(), "a SIGKILLed server cannot exit cleanly");
}

/// Wait for a child to exit by itself, at most `secs`.
fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server did not exit within {secs} s after STOP_DEV");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn image(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.raw");
    File::create(&path)
        .and_then(|f| f.set_len(len))
        .expect("create image");
    (dir, path)
}

fn open_direct(path: &std::path::Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn sysfs(dev: &std::path::Path, attr: &str) -> String {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/{attr}"))
        .unwrap_or_else(|e| panic!("read /sys/block/{name}/{attr}: {e}"))
        .trim()
        .to_string()
}

fn fill(buf: &mut [u8], block: u64, round: u64) {
    let mut x =
        block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_ne_bytes()[..chunk.len()]);
    }
}

fn say_where() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!(
        "ublk test running on kernel {} with {}",
        release.trim(),
        CONTROL_PATH
    );
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_device_round_trips_data_and_tears_down() {
    say_where();
    let size = 16u64 << 20;
    let (_dir, img) = image(size);
    // Data placed in the image beforehand must read through the device.
    let mut seed = vec![0u8; 1 << 20];
    fill(&mut seed, 1, 1);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&seed, 0)
        .unwrap();

    let mut be = UblkBackend::default();
    assert_eq!(be.kind(), FrontendKind::Ublk);
    let prepared = be.prepare(size, false).expect("prepare");
    let dev_id = be.dev_id().expect("dev id");
    let mut child = spawn_server(prepared, &img, false);
    let dev = be.activate(child.id()).expect("activate");
    assert_eq!(dev, std::path::PathBuf::from(format!("/dev/ublkb{dev_id}")));
    assert_eq!(sysfs(&dev, "size"), (size / 512).to_string());
    assert_eq!(sysfs(&dev, "queue/logical_block_size"), "512");
    assert_eq!(sysfs(&dev, "queue/physical_block_size"), "4096");
    assert_eq!(sysfs(&dev, "ro"), "0");

    let f = open_direct(&dev, true).expect("open device O_DIRECT");
    let mut a = Aligned::new(1 << 20);
    f.read_exact_at(a.buf(), 0).expect("read seed");
    assert!(
        a.buf() == &seed[..],
        "seeded image data must read through ublk"
    );

    // Write through the device; it must land in the image file.
    let mut w = Aligned::new(256 << 10);
    fill(w.buf(), 7, 3);
    f.write_all_at(w.buf(), 4 << 20).expect("write");
    f.sync_all().expect("fsync");
    let mut back = vec![0u8; 256 << 10];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 4 << 20)
        .unwrap();
    assert!(back == w.buf(), "written data must be in the image");

    // Discard and write-zeroes reach the image.
    let discard = |op: libc::c_ulong, off: u64, len: u64| {
        let range = [off, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the pointer.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), op, range.as_ptr()) };
        assert_eq!(rc, 0, "ioctl: {}", std::io::Error::last_os_error());
    };
    const BLKDISCARD: libc::c_ulong = 0x1277;
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    discard(BLKDISCARD, 4 << 20, 64 << 10);
    discard(BLKZEROOUT, (4 << 20) + (128 << 10), 64 << 10);
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 4 << 20)
        .unwrap();
    assert!(back[..64 << 10].iter().all(|&b| b == 0), "discard zeroes");
    assert!(back[64 << 10..128 << 10] == w.buf()[64 << 10..128 << 10]);
    assert!(
        back[128 << 10..192 << 10].iter().all(|&b| b == 0),
        "zeroout"
    );
    assert!(back[192 << 10..] == w.buf()[192 << 10..]);
    drop(f);

    be.teardown().expect("teardown");
    let st = wait_exit(&mut child, 30);
    assert!(st.success(), "server exits cleanly after STOP_DEV: {st:?}");
    assert!(!dev.exists(), "block device removed");
    assert!(
        !ublk_char_devices().contains(&format!("ublkc{dev_id}")),
        "char device removed"
    );
    be.teardown().expect("teardown is idempotent");
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_read_only_device_refuses_writes() {
    say_where();
    let size = 4u64 << 20;
    let (_dir, img) = image(size);
    let mut be = UblkBackend::default();
    let prepared = be.prepare(size, true).expect("prepare");
    let mut child = spawn_server(prepared, &img, true);
    let dev = be.activate(child.id()).expect("activate");
    assert_eq!(sysfs(&dev, "ro"), "1");
    // The kernel may refuse the open or the write; either way no byte may
    // reach the image.
    let mut a = Aligned::new(4096);
    a.buf().fill(0x5a);
    let err = open_direct(&dev, true)
        .and_then(|f| f.write_all_at(a.buf(), 0))
        .expect_err("writing to a read-only device");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        ),
        "unexpected error {err}"
    );
    let f = open_direct(&dev, false).expect("open read-only");
    f.read_exact_at(a.buf(), 0).expect("reads work");
    assert!(a.buf().iter().all(|&b| b == 0), "nothing was written");
    drop(f);
    let mut raw = vec![0u8; 4096];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut raw, 0)
        .unwrap();
    assert!(raw.iter().all(|&b| b == 0), "image untouched");
    be.teardown().expect("teardown");
    assert!(wait_exit(&mut child, 30).success());
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_teardown_after_worker_death_removes_device() {
    say_where();
    let size = 4u64 << 20;
    let (_dir, img) = image(size);
    // Prepared but never started, server killed: teardown still works.
    let mut be = UblkBackend::default();
    let prepared = be.prepare(size, false).expect("prepare");
    let dev_id = be.dev_id().unwrap();
    let mut child = spawn_server(prepared, &img, false);
    kill9(&mut child);
    assert!(
        be.recover().is_err(),
        "a never started device is not recovered"
    );
    be.teardown().expect("teardown of a never started device");
    assert!(!ublk_char_devices().contains(&format!("ublkc{dev_id}")));

    // Started, server killed, no recovery: teardown fails queued I/O and
    // removes the device instead of hanging.
    let prepared = be.prepare(size, false).expect("prepare again");
    let dev_id = be.dev_id().unwrap();
    let mut child = spawn_server(prepared, &img, false);
    let dev = be.activate(child.id()).expect("activate");
    kill9(&mut child);
    let dev2 = dev.clone();
    let (reader, tid) = spawn_with_tid(move || {
        let f = open_direct(&dev2, false)?;
        let mut a = Aligned::new(4096);
        f.read_exact_at(a.buf(), 8192)
    });
    // The event: the read is queued for the dead worker (D state).
    assert!(
        wait_blocked_in_kernel(tid, Duration::from_secs(30)),
        "the read did not queue for the dead worker (finished: {})",
        reader.is_finished()
    );
    be.teardown().expect("teardown after the worker died");
    let r = reader.join().expect("reader thread");
    assert!(r.is_err(), "I/O queued for a dead worker fails at teardown");
    assert!(!dev.exists());
    assert!(!ublk_char_devices().contains(&format!("ublkc{dev_id}")));
    be.teardown().expect("idempotent");
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_sigkilled_server_is_replaced_and_inflight_writes_complete() {
    sigkill_scenario(false);
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_sigkilled_vhd_server_keeps_allocations_consistent() {
    sigkill_scenario(true);
}

/// Writers rewrite blocks through the device while the server is
/// SIGKILLed three times and replaced: no write may fail, every block must
/// hold its last acknowledged data, in the device and in the image. With
/// `vhd`, a dynamic VHD with small blocks, so that kills land in block
/// allocations, and the image must reopen cleanly afterwards.
fn sigkill_scenario(vhd: bool) {
    say_where();
    const BLOCK: usize = 64 << 10;
    const WRITERS: u64 = 4;
    const BLOCKS_PER_WRITER: u64 = 32;
    const KILLS: usize = 3;
    let size = 32u64 << 20;
    let (_dir, img) = if vhd {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.vhd");
        let kind = vhd::create::CreateKind::Dynamic {
            block_size: 128 << 10,
        };
        tapjail_ctl::files::create_path(&path, size, &kind).expect("create vhd");
        (dir, path)
    } else {
        image(size)
    };
    let mut be = UblkBackend::default();
    let prepared = be.prepare(size, false).expect("prepare");
    let mut child = spawn_server(prepared, &img, false);
    let dev = be.activate(child.id()).expect("activate");

    // Writers: each owns BLOCKS_PER_WRITER blocks and rewrites them round
    // after round; `last[b]` is the round of the last successful write.
    let stop = Arc::new(AtomicBool::new(false));
    let total_blocks = WRITERS * BLOCKS_PER_WRITER;
    let last: Arc<Vec<AtomicU64>> =
        Arc::new((0..total_blocks).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    // Writes issued and not yet answered, to show some were in flight when
    // the server died.
    let inflight = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (dev, stop, last, errors, writes, inflight) = (
            dev.clone(),
            stop.clone(),
            last.clone(),
            errors.clone(),
            writes.clone(),
            inflight.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let f = open_direct(&dev, true).expect("open for writing");
            let mut buf = Aligned::new(BLOCK);
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for i in 0..BLOCKS_PER_WRITER {
                    let b = w * BLOCKS_PER_WRITER + i;
                    fill(buf.buf(), b, round);
                    inflight.fetch_add(1, Ordering::SeqCst);
                    let r = f.write_all_at(buf.buf(), b * BLOCK as u64);
                    inflight.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(()) => {
                            last[b as usize].store(round, Ordering::Relaxed);
                            writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("write error on block {b}: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }

    let wait_writes = |n: u64| {
        let target = writes.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(120);
        while writes.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "writes stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut inflight_at_kill = 0;
    for k in 0..KILLS {
        wait_writes(40);
        let t = Instant::now();
        kill9(&mut child);
        let caught = inflight.load(Ordering::SeqCst);
        inflight_at_kill += caught;
        let before = writes.load(Ordering::Relaxed);
        let prepared = be.recover().expect("recover");
        assert!(matches!(
            prepared.spec,
            FrontendSpec::Ublk {
                recovering: true,
                ..
            }
        ));
        child = spawn_server(prepared, &img, false);
        be.recovered(child.id()).expect("recovered");
        eprintln!(
            "kill {}: {caught} writes in flight; recovered in {} ms ({} writes completed meanwhile)",
            k + 1,
            t.elapsed().as_millis(),
            writes.load(Ordering::Relaxed) - before
        );
    }
    assert!(inflight_at_kill > 0, "no write was in flight at any kill");
    wait_writes(40);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("writer");
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no write may fail");
    assert!(
        tasks_in_d_state().is_empty(),
        "D state: {:?}",
        tasks_in_d_state()
    );

    // Every block holds the data of its last acknowledged write, both
    // through the device and in the image file.
    let f = open_direct(&dev, false).unwrap();
    let mut got = Aligned::new(BLOCK);
    let mut want = vec![0u8; BLOCK];
    for b in 0..total_blocks {
        let round = last[b as usize].load(Ordering::Relaxed);
        assert!(round > 0, "block {b} was never written");
        fill(&mut want, b, round);
        f.read_exact_at(got.buf(), b * BLOCK as u64).unwrap();
        assert!(got.buf() == &want[..], "block {b} mismatches round {round}");
    }
    drop(f);
    be.teardown().expect("teardown");
    assert!(wait_exit(&mut child, 30).success());

    // The image itself, reopened from scratch, holds the same data.
    let reopened: Box<dyn Image> = if vhd {
        Box::new(
            tapjail_ctl::files::open_vhd(&img, true, Default::default())
                .expect("VHD reopens cleanly"),
        )
    } else {
        Box::new(RawImage::open(Box::new(File::open(&img).unwrap()), "raw", true).unwrap())
    };
    let mut in_image = vec![0u8; BLOCK];
    for b in 0..total_blocks {
        let round = last[b as usize].load(Ordering::Relaxed);
        fill(&mut want, b, round);
        reopened
            .read_at(&mut in_image, b * BLOCK as u64)
            .expect("read the image");
        assert!(in_image == want, "block {b} not in the image");
    }
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_server_that_stops_by_itself_holds_io_for_its_successor() {
    say_where();
    let size = 4u64 << 20;
    let (_dir, img) = image(size);
    let mut be = UblkBackend::default();
    let prepared = be.prepare(size, false).expect("prepare");
    let mut child = spawn_server_stopping(prepared, &img, false, true);
    let dev = be.activate(child.id()).expect("activate");
    // Started: now the server hands its queue back and exits by itself.
    drop(child.stdin.take());
    let st = wait_exit(&mut child, 30);
    assert!(st.success(), "a stopped server exits cleanly: {st:?}");
    // I/O issued now waits for a successor instead of failing.
    let dev2 = dev.clone();
    let (writer, tid) = spawn_with_tid(move || {
        let f = open_direct(&dev2, true)?;
        let mut a = Aligned::new(4096);
        fill(a.buf(), 5, 5);
        f.write_all_at(a.buf(), 8192)?;
        f.sync_all()
    });
    // The event: the write is parked in the kernel (D state).
    assert!(
        wait_blocked_in_kernel(tid, Duration::from_secs(30)),
        "the write did not wait for the next server (finished: {})",
        writer.is_finished()
    );
    assert!(!writer.is_finished(), "I/O must wait for the next server");
    let prepared = be.recover().expect("recover after a clean exit");
    let mut child = spawn_server(prepared, &img, false);
    be.recovered(child.id()).expect("recovered");
    writer.join().unwrap().expect("the held write completes");
    let mut want = vec![0u8; 4096];
    fill(&mut want, 5, 5);
    let mut got = vec![0u8; 4096];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, 8192)
        .unwrap();
    assert!(got == want, "the held write reached the image");
    be.teardown().expect("teardown");
    assert!(wait_exit(&mut child, 30).success());
}

/// The real worker binary, built next to this test binary.
fn tapdisk() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TAPJAIL_TAPDISK") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("tapdisk");
    assert!(
        p.exists(),
        "{} missing: cargo build --bin tapdisk",
        p.display()
    );
    p
}

/// A confined `tapdisk --broker --frontend ublk`, driven over its control
/// socket the way the broker does: Open the image, Serve the device.
struct Confined {
    child: Child,
    sock: std::os::unix::net::UnixStream,
    uid: String,
}

impl Confined {
    fn ask(&self, msg: ToWorker, fds: &[std::os::fd::BorrowedFd<'_>]) -> FromWorker {
        frame::send_on(&self.sock, &msg, fds).expect("send to worker");
        self.recv()
    }

    fn recv(&self) -> FromWorker {
        frame::recv_on::<_, FromWorker>(&self.sock, frame::MAX_REPLY_FRAME)
            .expect("reply from worker")
            .0
    }
}

fn spawn_confined(prepared: Prepared, image: &std::path::Path, vhd: bool) -> Confined {
    use std::os::fd::AsFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    // A uid of its own per worker: a broker-mode worker refuses a uid some
    // other task runs as (`sandbox::sole_uid`), and tests run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let uid = (2_000_300_000 + (std::process::id() % 50_000) * 16 + n % 16).to_string();
    let mut cmd = Command::new(tapdisk());
    cmd.args([
        "--broker",
        "--frontend",
        "ublk",
        "--uid",
        &uid,
        "--gid",
        &uid,
    ]);
    // SAFETY: only dup2, async-signal-safe, on an fd open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, tapjail_common::worker_proto::CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn tapdisk");
    drop(theirs);
    let w = Confined {
        child,
        sock: ours,
        uid,
    };
    assert!(
        matches!(w.recv(), FromWorker::Ready { .. }),
        "worker not ready"
    );
    let leaf: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap()
        .into();
    let kind = if vhd { ImageKind::Vhd } else { ImageKind::Aio };
    let opened = w.ask(
        ToWorker::Open {
            kind,
            name: image.display().to_string(),
            read_only: false,
        },
        &[leaf.as_fd()],
    );
    assert!(
        matches!(opened, FromWorker::Opened { .. }),
        "open: {opened:?}"
    );
    drop(leaf);
    let mut fds = prepared.fds;
    let char_dev = fds.remove(0);
    let served = w.ask(ToWorker::Serve(prepared.spec), &[char_dev.as_fd()]);
    assert_eq!(served, FromWorker::Serving, "serve");
    // As the broker: keep no copy of /dev/ublkcN once the worker has it.
    drop(char_dev);
    w
}

#[test]
#[ignore = "needs ublk_drv: run inside nestvm via .ci/nestvm-tests"]
fn ublk_confined_tapdisk_serves_and_is_replaced_after_sigkill() {
    say_where();
    let size = 16u64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.vhd");
    tapjail_ctl::files::create_path(&img, size, &vhd::create::CreateKind::dynamic())
        .expect("create vhd");
    let mut be = UblkBackend::default();
    let prepared = be.prepare(size, false).expect("prepare");
    let mut w = spawn_confined(prepared, &img, true);
    let dev = be.activate(w.child.id()).expect("activate");
    // The worker really is confined: not root, no capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.child.id())).unwrap();
    assert!(
        status.contains(&format!("Uid:\t{}", w.uid)),
        "worker uid: {status}"
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "worker caps");
    assert!(status.contains("Seccomp:\t2"), "worker seccomp");
    match w.ask(ToWorker::Stats, &[]) {
        FromWorker::Stats(st) => assert_eq!(st.frontend.kind, "ublk"),
        other => panic!("stats: {other:?}"),
    }

    let f = open_direct(&dev, true).expect("open device");
    let mut a = Aligned::new(1 << 20);
    fill(a.buf(), 3, 1);
    f.write_all_at(a.buf(), 2 << 20)
        .expect("write through the confined worker");
    f.sync_all().expect("flush");
    drop(f);

    // SIGKILL it with a write queued behind the kill; a fresh confined
    // worker takes over and the write completes. Stopped first, so the
    // write surely waits on it (the event: the writer blocks in the
    // kernel), whatever the timing.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(w.child.id() as i32, libc::SIGSTOP) }, 0);
    let dev2 = dev.clone();
    let (writer, tid) = spawn_with_tid(move || {
        let f = open_direct(&dev2, true)?;
        let mut a = Aligned::new(64 << 10);
        for i in 0..64u64 {
            fill(a.buf(), 100 + i, 1);
            f.write_all_at(a.buf(), (8 << 20) + i * (64 << 10))?;
        }
        f.sync_all()
    });
    assert!(
        wait_blocked_in_kernel(tid, Duration::from_secs(30)),
        "the write did not wait on the stopped worker (finished: {})",
        writer.is_finished()
    );
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    let prepared = be.recover().expect("recover");
    let mut w2 = spawn_confined(prepared, &img, true);
    be.recovered(w2.child.id()).expect("recovered");
    writer
        .join()
        .unwrap()
        .expect("writes across the kill succeed");

    let f = open_direct(&dev, false).unwrap();
    let mut got = Aligned::new(1 << 20);
    f.read_exact_at(got.buf(), 2 << 20).unwrap();
    assert!(
        got.buf() == a.buf(),
        "data written before the kill survives"
    );
    let mut got = Aligned::new(64 << 10);
    let mut want = vec![0u8; 64 << 10];
    for i in 0..64u64 {
        fill(&mut want, 100 + i, 1);
        f.read_exact_at(got.buf(), (8 << 20) + i * (64 << 10))
            .unwrap();
        assert!(got.buf() == &want[..], "write {i} across the kill");
    }
    drop(f);
    be.teardown().expect("teardown");
    assert_eq!(w2.ask(ToWorker::Shutdown, &[]), FromWorker::Ok);
    assert!(w2.child.wait().unwrap().success());
    let reopened =
        tapjail_ctl::files::open_vhd(&img, true, Default::default()).expect("VHD reopens");
    let mut back = vec![0u8; 1 << 20];
    reopened.read_at(&mut back, 2 << 20).unwrap();
    assert!(back == a.buf());
}

#[test]
fn ublk_unavailable_without_control_node_names_config() {
    // Runs everywhere: on a host without the driver, prepare must say why.
    if Path::new(CONTROL_PATH).exists() {
        assert!(available().is_ok());
        return;
    }
    let mut be = UblkBackend::default();
    match be.prepare(1 << 20, false) {
        Err(DeviceError::Unavailable(m)) => assert!(m.contains("CONFIG_BLK_DEV_UBLK"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    be.teardown().expect("teardown of nothing");
}
