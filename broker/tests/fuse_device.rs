//! FUSE + loop backend against the real kernel: the broker half
//! (`FuseBackend`) with the worker half (`FuseFrontend`) running in a child
//! process — this binary re-executed with `TAPJAIL_FUSE_TEST_WORKER` set —
//! so a worker can be SIGKILLed mid-I/O exactly like a real tapdisk.
//!
//! Needs root, `/dev/fuse` and loop devices; each test uses its own temp
//! dir and loop device and checks it leaves no loop device, FUSE
//! connection, process or fd behind. `harness = false` (libtest-mimic) so
//! the worker mode can take over `main` before any test machinery starts.

use libtest_mimic::{Arguments, Failed, Trial};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tapjail_broker::device::fuse::{FuseBackend, FuseOptions, MountAt, Resend};
use tapjail_broker::device::fuse_mount;
use tapjail_broker::device::{DeviceBackend, Prepared};
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_common::proto::ImageKind;
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_testsupport::{fio_verify_writer, fuse_loop_turn, in_ci, is_root, pattern, Aligned};
use tapjail_worker::disk::Disk;
use tapjail_worker::frontend::fuse::{FuseConfig, FuseFrontend};
use tapjail_worker::frontend::Frontend;
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::{Extent, Image, ImageError, LayerStats};

const WORKER_ENV: &str = "TAPJAIL_FUSE_TEST_WORKER";
const MIB: u64 = 1 << 20;

type R = Result<(), Failed>;
type TestFn = fn() -> R;

fn main() {
    if let Ok(image) = std::env::var(WORKER_ENV) {
        worker_main(&image);
    }
    let mut args = Arguments::from_args();
    // Tests share the host's loop devices; keep them one at a time.
    args.test_threads = Some(1);
    let skip = skip_reason();
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "fuse_loop_mkfs_mount_write_then_teardown_leaves_nothing",
            fuse_loop_mkfs_mount_write_then_teardown_leaves_nothing,
        ),
        (
            "fuse_loop_read_only_refuses_writes_and_image_is_unchanged",
            fuse_loop_read_only_refuses_writes_and_image_is_unchanged,
        ),
        (
            "fuse_loop_discard_punches_holes_in_the_image",
            fuse_loop_discard_punches_holes_in_the_image,
        ),
        (
            "fuse_worker_sigkilled_three_times_mid_io_resend_loses_nothing",
            fuse_worker_sigkilled_three_times_mid_io_resend_loses_nothing,
        ),
        (
            "fuse_worker_sigkilled_without_resend_fails_io_and_nothing_hangs",
            fuse_worker_sigkilled_without_resend_fails_io_and_nothing_hangs,
        ),
        (
            "fuse_stopped_worker_teardown_aborts_after_the_timeout",
            fuse_stopped_worker_teardown_aborts_after_the_timeout,
        ),
        (
            "fuse_dir_mount_fallback_serves_and_is_removed",
            fuse_dir_mount_fallback_serves_and_is_removed,
        ),
        (
            "fuse_teardown_is_idempotent_and_drop_cleans_up",
            fuse_teardown_is_idempotent_and_drop_cleans_up,
        ),
        (
            "fuse_abort_reaches_a_connection_made_after_the_kept_fusectl_mount",
            fuse_abort_reaches_a_connection_made_after_the_kept_fusectl_mount,
        ),
        (
            "fuse_hundred_attach_detach_cycles_leak_nothing",
            fuse_hundred_attach_detach_cycles_leak_nothing,
        ),
        (
            "fuse_confined_tapdisk_serves_a_dynamic_vhd_for_mkfs",
            fuse_confined_tapdisk_serves_a_dynamic_vhd_for_mkfs,
        ),
        (
            "fuse_confined_tapdisk_sigkilled_three_times_under_fio_verify",
            fuse_confined_tapdisk_sigkilled_three_times_under_fio_verify,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| match &skip {
            // A CI run must not turn green by skipping: the missing
            // precondition fails every test, by name.
            Some(why) if in_ci() => {
                let why = why.clone();
                Trial::test(name, move || {
                    Err(format!("precondition missing under CI=true: {why}").into())
                })
            }
            Some(why) => Trial::test(name, f)
                .with_ignored_flag(true)
                .with_kind(why.as_str()),
            None => Trial::test(name, move || {
                let _turn = serial()?;
                f()
            }),
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// FUSE tests take turns with every other FUSE + loop test on this host
/// (see [`fuse_loop_turn`]).
fn serial() -> Result<File, Failed> {
    Ok(fuse_loop_turn()?)
}

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs-root".into());
    }
    for node in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(node).exists() {
            return Some(format!("needs-{node}"));
        }
    }
    None
}

// ---------------------------------------------------------------- worker

/// An image that answers slowly, so a SIGKILL lands while requests are in
/// the worker's hands.
#[derive(Debug)]
struct Slow {
    inner: RawImage,
    delay: Duration,
}

impl Image for Slow {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        std::thread::sleep(self.delay);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), ImageError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        self.inner.block_status(offset, len)
    }
    fn stats(&self) -> Vec<LayerStats> {
        self.inner.stats()
    }
}

/// The child: serve `image` on the connection at fd 3, print "ready" when
/// the kernel can use it.
fn worker_main(image: &str) -> ! {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let ro = env("TAPJAIL_FUSE_TEST_RO") == "1";
    let resend = env("TAPJAIL_FUSE_TEST_RESEND") == "1";
    let delay = Duration::from_micros(env("TAPJAIL_FUSE_TEST_DELAY_US").parse().unwrap_or(0));
    let run = || -> Result<(), String> {
        let file = OpenOptions::new()
            .read(true)
            .write(!ro)
            .open(image)
            .map_err(|e| e.to_string())?;
        let raw = RawImage::open(Box::new(file), image, ro).map_err(|e| e.to_string())?;
        let img: Arc<dyn Image> = if delay.is_zero() {
            Arc::new(raw)
        } else {
            Arc::new(Slow { inner: raw, delay })
        };
        let disk = Disk::new(img);
        // SAFETY: the parent placed the connection at fd 3 for us.
        let dev = unsafe { OwnedFd::from_raw_fd(3) };
        let mut fe = FuseFrontend::new(
            dev,
            FuseConfig {
                file_name: "disk".into(),
                resend,
                threads: 4,
            },
        )
        .map_err(|e| e.to_string())?;
        fe.handshake(&disk).map_err(|e| e.to_string())?;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        let served = fe.serve(disk.clone()).map_err(|e| e.to_string());
        let closed = disk.close().map_err(|e| e.to_string());
        served.and(closed)
    };
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("test worker: {e}");
            std::process::exit(1)
        }
    }
}

/// A worker child: this binary in worker mode (it prints "ready" once the
/// handshake is done), or the real confined `tapdisk` driven over its
/// control socket the way the broker drives it.
struct Worker {
    child: Child,
    /// Killed by the test on purpose: its exit status says nothing.
    killed: bool,
    /// The control socket of a confined tapdisk; dropping it makes the
    /// worker close its image and exit.
    control: Option<UnixStream>,
}

impl Worker {
    fn spawn(prepared: Prepared, image: &Path, ro: bool, delay_us: u64) -> Result<Self, Failed> {
        let resend = matches!(
            prepared.spec,
            tapjail_common::worker_proto::FrontendSpec::Fuse { resend: true, .. }
        );
        let fd = prepared.fds.into_iter().next().ok_or("no fuse fd")?;
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(WORKER_ENV, image)
            .env("TAPJAIL_FUSE_TEST_RO", if ro { "1" } else { "0" })
            .env("TAPJAIL_FUSE_TEST_RESEND", if resend { "1" } else { "0" })
            .env("TAPJAIL_FUSE_TEST_DELAY_US", delay_us.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls:
        // dup2 and fcntl on fds this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(fd);
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.trim() == "ready" => Ok(Worker {
                child,
                killed: false,
                control: None,
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("worker did not become ready: {other:?}").into())
            }
        }
    }

    /// The real `tapdisk --broker --frontend fuse`: Ready, Open, Serve.
    fn confined(
        prepared: Prepared,
        image: &Path,
        kind: ImageKind,
        ro: bool,
    ) -> Result<Self, Failed> {
        let tapdisk = target_dir().join("tapdisk");
        check(
            tapdisk.exists(),
            format!(
                "{} missing: cargo build --workspace --bins",
                tapdisk.display()
            ),
        )?;
        let (ours, theirs) = UnixStream::pair()?;
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new(tapdisk);
        cmd.args(["--broker", "--frontend", "fuse"])
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe dup2 in the forked child. The
        // worker keeps our RLIMIT_MEMLOCK, as under the broker; on hosts
        // without CAP_SYS_RESOURCE that is a few MiB, which the frontend
        // must make do with.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        let mut w = Worker {
            child,
            killed: false,
            control: Some(ours),
        };
        ours_recv(&w, |m| matches!(m, FromWorker::Ready { .. }), "Ready")?;
        let file: OwnedFd = OpenOptions::new().read(true).write(!ro).open(image)?.into();
        w.send(
            ToWorker::Open {
                kind,
                name: image.display().to_string(),
                read_only: ro,
            },
            &[file.as_fd()],
        )?;
        ours_recv(&w, |m| matches!(m, FromWorker::Opened { .. }), "Opened")?;
        w.send(
            ToWorker::Serve(prepared.spec),
            &prepared.fds.iter().map(|f| f.as_fd()).collect::<Vec<_>>(),
        )?;
        drop(prepared.fds);
        ours_recv(&w, |m| matches!(m, FromWorker::Serving), "Serving")?;
        Ok(w)
    }

    fn send(&mut self, msg: ToWorker, fds: &[BorrowedFd<'_>]) -> R {
        let sock = self.control.as_ref().ok_or("not a confined worker")?;
        frame::send_on(sock, &msg, fds).map_err(|e| format!("send {msg:?}: {e}"))?;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        self.killed = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for a clean exit (the connection went away).
    fn wait_exit(&mut self, within: Duration) -> R {
        // A confined worker exits once its broker (we) hangs up.
        drop(self.control.take());
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return if st.success() || self.killed {
                    Ok(())
                } else {
                    Err(format!("worker exited with {st}").into())
                };
            }
            if Instant::now() > deadline {
                self.kill();
                return Err("worker still running after the device was torn down".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ours_recv(w: &Worker, want: impl Fn(&FromWorker) -> bool, what: &str) -> R {
    let sock = w.control.as_ref().ok_or("not a confined worker")?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (msg, _fds): (FromWorker, Vec<OwnedFd>) =
        frame::recv_on(sock, MAX_REQUEST_FRAME).map_err(|e| format!("waiting for {what}: {e}"))?;
    check(want(&msg), format!("expected {what}, got {msg:?}"))
}

/// `target/<profile>`, where cargo put the workspace's binaries.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

// --------------------------------------------------------------- helpers

fn sparse_image(dir: &Path, len: u64) -> Result<PathBuf, Failed> {
    let p = dir.join("disk.raw");
    File::create(&p)?.set_len(len)?;
    Ok(p)
}

fn run(cmd: &mut Command) -> R {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

fn open_fds() -> usize {
    // The fusectl mount the backend keeps for the process (where the host
    // has none) is made by the first abort or `waiting`: make it before
    // counting, so it is not taken for a leak of whichever test came first.
    let _ = fuse_mount::waiting(0);
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn check(cond: bool, what: impl Into<String>) -> R {
    if cond {
        Ok(())
    } else {
        Err(what.into().into())
    }
}

/// Wait (up to 30 s) until a request waits on FUSE connection `conn`:
/// I/O is in flight to its worker, so a kill now lands mid-I/O, and after
/// a kill the request is held for the next worker instead of failing.
fn wait_in_flight(conn: u32, when: &str) -> R {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fuse_mount::waiting(conn).unwrap_or(0) == 0 {
        check(
            Instant::now() < deadline,
            format!("no request in flight on the FUSE connection {when}"),
        )?;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A backend with a device up, served by one worker.
struct Device {
    backend: FuseBackend,
    worker: Worker,
    loop_path: PathBuf,
    loop_number: u32,
    conn: u32,
    fds_before: usize,
}

fn options(name: &str) -> FuseOptions {
    let mut o = FuseOptions::new(format!("tapjail-test:{name}"));
    o.timeout = Duration::from_secs(60);
    o
}

fn bring_up(
    opts: FuseOptions,
    image: &Path,
    size: u64,
    ro: bool,
    delay_us: u64,
) -> Result<Device, Failed> {
    let fds_before = open_fds();
    let mut backend = FuseBackend::new(opts);
    let prepared = backend.prepare(size, ro)?;
    let worker = Worker::spawn(prepared, image, ro, delay_us)?;
    let loop_path = backend.activate(worker.pid())?;
    let dev = backend.loop_device().ok_or("no loop device")?;
    let loop_number = dev.number();
    check(dev.direct_io(), "loop did not grant direct I/O over FUSE")?;
    let dio = fs::read_to_string(format!("/sys/block/loop{loop_number}/loop/dio"))?;
    check(
        dio.trim() == "1",
        format!("/sys/block/loop{loop_number}/loop/dio is {dio:?}, not 1"),
    )?;
    let conn = backend.connection().ok_or("no connection")?;
    Ok(Device {
        backend,
        worker,
        loop_path,
        loop_number,
        conn,
        fds_before,
    })
}

impl Device {
    /// Tear down and check that nothing is left.
    fn tear_down(mut self) -> R {
        self.backend.teardown()?;
        self.worker.wait_exit(Duration::from_secs(10))?;
        leaves_nothing(self.loop_number, self.conn)?;
        let fds = open_fds();
        check(
            fds <= self.fds_before,
            format!("fds leaked: {} before, {fds} after", self.fds_before),
        )
    }
}

/// The loop device is unbound and the FUSE connection gone.
fn leaves_nothing(loop_number: u32, conn: u32) -> R {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let backing = fs::read_to_string(format!("/sys/block/loop{loop_number}/loop/backing_file"));
        let bound_to_us = backing.as_deref().is_ok_and(|b| b.trim() == "/disk");
        let conn_alive = fuse_mount::waiting(conn).is_some();
        if !bound_to_us && !conn_alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "left behind: loop{loop_number} bound={bound_to_us}, fuse connection {conn} alive={conn_alive}"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for `child` (a writer) with a deadline, failing early if the worker
/// serving its device dies: then nothing would ever answer its I/O.
fn wait_writer(
    child: Child,
    worker: &mut Worker,
    within: Duration,
) -> Result<std::process::Output, Failed> {
    let mut child = child;
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if let Some(st) = worker.child.try_wait()? {
            let _ = child.kill();
            let _ = child.wait();
            return Err(
                format!("the serving worker died mid-I/O ({st}); see dmesg for SIGSYS").into(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("writer still running after {within:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_direct(path: &Path, len: usize) -> Result<Vec<u8>, Failed> {
    // Through the page cache of a fresh open is fine after O_DIRECT writes,
    // but read the device O_DIRECT anyway so nothing stale can hide.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut out = Vec::with_capacity(len);
    let mut buf = Aligned::new(MIB as usize);
    let mut off = 0u64;
    while out.len() < len {
        let n = f.read_at(buf.buf(), off)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf.buf()[..n]);
        off += n as u64;
    }
    out.truncate(len);
    Ok(out)
}

// ----------------------------------------------------------------- tests

fn fuse_loop_mkfs_mount_write_then_teardown_leaves_nothing() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 128 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let dev = bring_up(options("mkfs"), &image, size, false, 0)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev.loop_path))?;
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt)?;
    run(Command::new("mount").arg(&dev.loop_path).arg(&mnt))?;
    let data = pattern(20 * MIB as usize, 42);
    let written = fs::write(mnt.join("f"), &data);
    let umounted = run(Command::new("umount").arg(&mnt));
    written?;
    umounted?;
    run(Command::new("e2fsck").args(["-fn"]).arg(&dev.loop_path))?;
    dev.tear_down()?;
    // The image itself holds a clean filesystem with the file in it.
    run(Command::new("e2fsck").args(["-fn"]).arg(&image))?;
    let out = Command::new("debugfs")
        .args(["-R", "cat /f"])
        .arg(&image)
        .stderr(Stdio::null())
        .output()?;
    check(out.stdout == data, "file read back from the image differs")?;
    // Thin: a 128 MiB image holding 20 MiB stays well under its size.
    let used = fs::metadata(&image)?.blocks() * 512;
    check(
        used < 64 * MIB,
        format!("image not thin: {used} bytes used"),
    )
}

fn fuse_loop_read_only_refuses_writes_and_image_is_unchanged() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 8 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    fs::OpenOptions::new()
        .write(true)
        .open(&image)?
        .write_all_at(&pattern(size as usize, 7), 0)?;
    let before = fs::read(&image)?;
    let dev = bring_up(options("ro"), &image, size, true, 0)?;
    let flags = dev.backend.loop_device().ok_or("no loop")?.flags()?;
    check(flags & 1 != 0, "loop device not read-only")?;
    // The block layer refuses the write (the open itself is allowed).
    let err = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev.loop_path)
        .and_then(|f| {
            let mut buf = Aligned::new(4096);
            f.write_all_at(buf.buf(), 0)
        })
        .err()
        .ok_or("wrote to a read-only device")?;
    check(
        matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        format!("unexpected error {err}"),
    )?;
    check(
        read_direct(&dev.loop_path, size as usize)? == before,
        "device content differs from the image",
    )?;
    dev.tear_down()?;
    check(fs::read(&image)? == before, "read-only image changed")
}

fn fuse_loop_discard_punches_holes_in_the_image() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 16 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let dev = bring_up(options("discard"), &image, size, false, 0)?;
    {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.loop_path)?;
        let mut buf = Aligned::new(MIB as usize);
        buf.buf().copy_from_slice(&pattern(MIB as usize, 3));
        for i in 0..8 {
            f.write_all_at(buf.buf(), i * MIB)?;
        }
        f.sync_all()?;
    }
    let used_before = fs::metadata(&image)?.blocks() * 512;
    check(
        used_before >= 8 * MIB,
        format!("writes not in the image: {used_before}"),
    )?;
    run(Command::new("blkdiscard")
        .args(["-o", "0", "-l", &(4 * MIB).to_string()])
        .arg(&dev.loop_path))?;
    let used_after = fs::metadata(&image)?.blocks() * 512;
    check(
        used_after + 4 * MIB <= used_before,
        format!("discard did not punch the image: {used_before} -> {used_after}"),
    )?;
    let content = read_direct(&dev.loop_path, (8 * MIB) as usize)?;
    check(
        content[..(4 * MIB) as usize].iter().all(|&b| b == 0),
        "discarded range does not read as zeroes",
    )?;
    check(
        content[(4 * MIB) as usize..(5 * MIB) as usize] == pattern(MIB as usize, 3)[..],
        "data next to the discarded range changed",
    )?;
    dev.tear_down()
}

/// Spawn a direct-I/O writer of `src` onto `dev`.
fn dd_writer(src: &Path, dev: &Path) -> Result<Child, Failed> {
    Ok(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=128k",
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn fuse_worker_sigkilled_three_times_mid_io_resend_loses_nothing() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 64 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let data = pattern((32 * MIB) as usize, 99);
    let src = tmp.path().join("src");
    fs::write(&src, &data)?;
    let mut opts = options("resend");
    opts.resend = Resend::Auto;
    // 10 ms per request, 256 requests one at a time: the writer runs
    // about 2.6 s, so every kill lands mid-I/O.
    let mut dev = bring_up(opts, &image, size, false, 10_000)?;
    check(
        dev.backend.resend_supported(),
        "this kernel lacks FUSE_NOTIFY_RESEND",
    )?;
    let mut writer = dd_writer(&src, &dev.loop_path)?;
    for round in 1..=3 {
        wait_in_flight(dev.conn, &format!("before kill {round}"))?;
        check(
            writer.try_wait()?.is_none(),
            format!("writer finished before kill {round}"),
        )?;
        dev.worker.kill();
        // The broker's dup keeps the connection: requests wait, none fail.
        wait_in_flight(dev.conn, &format!("after kill {round}"))?;
        let prepared = dev.backend.recover()?;
        dev.worker = Worker::spawn(prepared, &image, false, 10_000)?;
        dev.backend.recovered(dev.worker.pid())?;
    }
    let out = wait_writer(writer, &mut dev.worker, Duration::from_secs(120))?;
    check(
        out.status.success(),
        format!("writer failed: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    check(dev.backend.restarts() == 3, "restart count")?;
    check(
        read_direct(&dev.loop_path, data.len())? == data,
        "device content differs from what was written",
    )?;
    dev.tear_down()?;
    let on_disk = fs::read(&image)?;
    check(
        on_disk[..data.len()] == data[..],
        "image content differs from what was written",
    )
}

fn fuse_worker_sigkilled_without_resend_fails_io_and_nothing_hangs() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 64 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let src = tmp.path().join("src");
    fs::write(&src, pattern((32 * MIB) as usize, 5))?;
    let mut opts = options("noresend");
    opts.resend = Resend::Never;
    let mut dev = bring_up(opts, &image, size, false, 10_000)?;
    let mut writer = dd_writer(&src, &dev.loop_path)?;
    wait_in_flight(dev.conn, "before the kill")?;
    dev.worker.kill();
    let started = Instant::now();
    check(
        dev.backend.recover().is_err(),
        "recover succeeded without resend",
    )?;
    // The writer gets EIO promptly instead of hanging in D state.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = writer.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let state =
                fs::read_to_string(format!("/proc/{}/stat", writer.id())).unwrap_or_default();
            let _ = writer.kill();
            return Err(format!("writer still blocked 10 s after abort: {state}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    check(!status.success(), "writer succeeded on an aborted device")?;
    let mut err = String::new();
    writer
        .stderr
        .take()
        .ok_or("stderr")?
        .read_to_string(&mut err)?;
    check(
        err.contains("Input/output error") || err.contains("Transport endpoint"),
        format!("writer failed with something else: {err}"),
    )?;
    check(
        started.elapsed() < Duration::from_secs(10),
        "abort took too long",
    )?;
    dev.tear_down()
}

fn fuse_stopped_worker_teardown_aborts_after_the_timeout() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 16 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let mut opts = options("stopped");
    opts.timeout = Duration::from_secs(2);
    let dev = bring_up(opts, &image, size, false, 0)?;
    // Dirty the device's page cache so teardown's flush needs the worker.
    {
        let mut f = OpenOptions::new().write(true).open(&dev.loop_path)?;
        f.write_all(&pattern(MIB as usize, 1))?;
    }
    let pid = libc::pid_t::try_from(dev.worker.pid())?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let Device {
        mut backend,
        mut worker,
        loop_number,
        conn,
        ..
    } = dev;
    // Wait until every thread of the worker is stopped ("T"), so nothing
    // it had already read can still be answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string(format!("/proc/{pid}/stat"))?
        .split(") ")
        .nth(1)
        .is_some_and(|rest| rest.starts_with('T'))
    {
        check(Instant::now() < deadline, "worker did not stop")?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let r = backend.teardown();
    let took = started.elapsed();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    check(
        r.is_err(),
        format!("teardown of a wedged worker reported success after {took:?}"),
    )?;
    check(
        took < Duration::from_secs(8),
        format!("teardown took {took:?}"),
    )?;
    worker.wait_exit(Duration::from_secs(10))?;
    leaves_nothing(loop_number, conn)
}

fn fuse_dir_mount_fallback_serves_and_is_removed() -> R {
    let tmp = tempfile::tempdir()?;
    let private = tmp.path().join("fuse");
    fs::DirBuilder::new().create(&private)?;
    fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let point = private.join("0");
    let size = 8 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    let mut opts = options("dir");
    opts.mount = MountAt::Dir(point.clone());
    let dev = bring_up(opts, &image, size, false, 0)?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    check(
        mountinfo.contains(&*point.to_string_lossy()),
        "directory mount not in mountinfo",
    )?;
    let mode = fs::metadata(&point)?.mode() & 0o7777;
    check(mode == 0o500, format!("mount root mode {mode:o}"))?;
    {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.loop_path)?;
        let mut buf = Aligned::new(MIB as usize);
        buf.buf().copy_from_slice(&pattern(MIB as usize, 11));
        f.write_all_at(buf.buf(), MIB)?;
    }
    dev.tear_down()?;
    check(!point.exists(), "mount point directory left behind")?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    check(
        !mountinfo.contains(&*point.to_string_lossy()),
        "mount left behind",
    )?;
    let on_disk = fs::read(&image)?;
    check(
        on_disk[MIB as usize..2 * MIB as usize] == pattern(MIB as usize, 11)[..],
        "data not in the image",
    )
}

fn fuse_teardown_is_idempotent_and_drop_cleans_up() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 4 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    // Dead worker, then teardown twice.
    let Device {
        mut backend,
        mut worker,
        loop_number,
        conn,
        ..
    } = bring_up(options("idem"), &image, size, false, 0)?;
    worker.kill();
    let started = Instant::now();
    backend.teardown()?;
    check(
        started.elapsed() < Duration::from_secs(5),
        "teardown with a dead worker waited for it",
    )?;
    backend.teardown()?;
    leaves_nothing(loop_number, conn)?;
    // Dropping an active backend tears it down too.
    let dev = bring_up(options("drop"), &image, size, false, 0)?;
    let (n, c) = (dev.loop_number, dev.conn);
    let Device {
        backend,
        mut worker,
        ..
    } = dev;
    drop(backend);
    worker.wait_exit(Duration::from_secs(10))?;
    leaves_nothing(n, c)
}

/// The broker mounts fusectl once and keeps it (where the host has not
/// mounted it): a connection made after that mount must still be found
/// there, or a dead worker's teardown could not abort it.
fn fuse_abort_reaches_a_connection_made_after_the_kept_fusectl_mount() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 4 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    // Whatever the order tests ran in, the kept mount exists now.
    let _ = fuse_mount::waiting(0);
    let Device {
        mut backend,
        mut worker,
        loop_number,
        conn,
        ..
    } = bring_up(options("late"), &image, size, false, 0)?;
    check(
        fuse_mount::waiting(conn).is_some(),
        format!("connection {conn}, made after the fusectl mount, is not in it"),
    )?;
    // A dead worker's teardown aborts the connection through that mount
    // first; an abort that cannot find it fails the teardown.
    worker.kill();
    backend.teardown()?;
    leaves_nothing(loop_number, conn)
}

fn fuse_hundred_attach_detach_cycles_leak_nothing() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 4 * MIB;
    let image = sparse_image(tmp.path(), size)?;
    // Other tests may run in parallel under nextest, so check our own
    // cycles only: this process's fds, and each cycle's loop device and
    // connection (tear_down also waits for each worker to exit).
    let fds_before = open_fds();
    let mut conns = Vec::new();
    for i in 0..100u64 {
        let dev = bring_up(options("cycle"), &image, size, false, 0)?;
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.loop_path)?;
        let mut buf = Aligned::new(4096);
        buf.buf().fill(i as u8);
        f.write_all_at(buf.buf(), i * 4096)?;
        drop(f);
        conns.push((dev.loop_number, dev.conn));
        dev.tear_down()?;
    }
    for (n, c) in conns {
        leaves_nothing(n, c)?;
    }
    let fds = open_fds();
    check(fds <= fds_before, format!("fds: {fds_before} -> {fds}"))?;
    let data = fs::read(&image)?;
    for i in 0..100usize {
        check(
            data[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8),
            format!("cycle {i}'s write is not in the image"),
        )?;
    }
    Ok(())
}

/// A device served by the real confined tapdisk.
fn bring_up_confined(opts: FuseOptions, image: &Path, size: u64) -> Result<Device, Failed> {
    let fds_before = open_fds();
    let mut backend = FuseBackend::new(opts);
    let prepared = backend.prepare(size, false)?;
    let worker = Worker::confined(prepared, image, ImageKind::Vhd, false)?;
    let loop_path = backend.activate(worker.pid())?;
    let dev = backend.loop_device().ok_or("no loop device")?;
    let loop_number = dev.number();
    let conn = backend.connection().ok_or("no connection")?;
    Ok(Device {
        backend,
        worker,
        loop_path,
        loop_number,
        conn,
        fds_before,
    })
}

fn dynamic_vhd(dir: &Path, size: u64) -> Result<PathBuf, Failed> {
    let p = dir.join("disk.vhd");
    tapjail_ctl::files::create_path(
        &p,
        size,
        &tapjail_worker::image::vhd::create::CreateKind::dynamic(),
    )
    .map_err(|e| e.to_string())?;
    Ok(p)
}

fn vhd_is_clean(vhd: &Path) -> R {
    let problems = tapjail_ctl::files::check_path(vhd).map_err(|e| e.to_string())?;
    check(problems.is_empty(), format!("vhd check: {problems:?}"))
}

fn fuse_confined_tapdisk_serves_a_dynamic_vhd_for_mkfs() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 256 * MIB;
    let vhd = dynamic_vhd(tmp.path(), size)?;
    let dev = bring_up_confined(options("confined"), &vhd, size)?;
    check(
        dev.backend.loop_device().is_some_and(|d| d.direct_io()),
        "no direct I/O",
    )?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev.loop_path))?;
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt)?;
    run(Command::new("mount").arg(&dev.loop_path).arg(&mnt))?;
    let data = pattern((20 * MIB) as usize, 77);
    let written = fs::write(mnt.join("f"), &data);
    let umounted = run(Command::new("umount").arg(&mnt));
    written?;
    umounted?;
    dev.tear_down()?;
    vhd_is_clean(&vhd)?;
    let used = fs::metadata(&vhd)?.blocks() * 512;
    check(used < 96 * MIB, format!("VHD not thin: {used} bytes used"))?;
    let raw = tmp.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&vhd)
        .arg(&raw))?;
    run(Command::new("e2fsck").args(["-fn"]).arg(&raw))?;
    let out = Command::new("debugfs")
        .args(["-R", "cat /f"])
        .arg(&raw)
        .stderr(Stdio::null())
        .output()?;
    check(out.stdout == data, "file read back from the VHD differs")
}

fn fuse_confined_tapdisk_sigkilled_three_times_under_fio_verify() -> R {
    let tmp = tempfile::tempdir()?;
    let size = 512 * MIB;
    let vhd = dynamic_vhd(tmp.path(), size)?;
    let mut dev = bring_up_confined(options("confined-kill"), &vhd, size)?;
    check(
        dev.backend.resend_supported(),
        "this kernel lacks FUSE_NOTIFY_RESEND",
    )?;
    // Write 384 MiB at depth 16 with checksums, then read it all back and
    // verify: any lost, failed or misplaced write fails fio.
    let mut fio = fio_verify_writer(&dev.loop_path, "384M").spawn()?;
    let mut held = Vec::new();
    for round in 1..=3 {
        wait_in_flight(dev.conn, &format!("before kill {round}"))?;
        check(
            fio.try_wait()?.is_none(),
            format!("fio finished before kill {round}"),
        )?;
        dev.worker.kill();
        wait_in_flight(dev.conn, &format!("after kill {round}"))?;
        held.push(fuse_mount::waiting(dev.conn).unwrap_or(0));
        let prepared = dev.backend.recover()?;
        dev.worker = Worker::confined(prepared, &vhd, ImageKind::Vhd, false)?;
        dev.backend.recovered(dev.worker.pid())?;
    }
    let out = wait_writer(fio, &mut dev.worker, Duration::from_secs(300))?;
    check(
        out.status.success(),
        format!(
            "fio failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    check(
        held.iter().any(|&n| n > 0),
        format!("no kill caught requests in flight: {held:?}"),
    )?;
    check(dev.backend.restarts() == 3, "restart count")?;
    dev.tear_down()?;
    vhd_is_clean(&vhd)
}
