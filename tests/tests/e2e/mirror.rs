//! Write mirroring, `open -2 URI [-s]` and `unpause -2 URI`, against a
//! real broker with FUSE + loop devices and `qemu-nbd` as the secondary on
//! a unix socket in a directory the tenant's `mirror` key grants.

use crate::*;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tapjail_testsupport::{
    fio_verify_writer, fuse_loop_turn, have, is_root, pattern, require, Aligned,
};

const MIB: u64 = 1024 * 1024;

fn preconditions() -> bool {
    require(is_root(), "root (FUSE mounts, loop devices)")
        && require(have("qemu-nbd"), "qemu-nbd (the secondary)")
        && require(have("qemu-img"), "qemu-img (compares the data)")
        && require(have("fio"), "fio (verified writes)")
}

/// `qemu-nbd` serving a raw file on a unix socket; killed on drop.
struct Secondary {
    child: Option<Child>,
    sock: PathBuf,
    file: PathBuf,
}

impl Secondary {
    fn start(dir: &Path, name: &str, size: u64) -> Secondary {
        let file = dir.join(format!("{name}.img"));
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("secondary image");
        let sock = dir.join(format!("{name}.sock"));
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-t",
                "-e",
                "4",
                "--cache=none",
                "--aio=threads",
            ])
            .arg("-k")
            .arg(&sock)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        assert!(
            eventually(Duration::from_secs(20), || sock.exists()),
            "qemu-nbd made no socket"
        );
        Secondary {
            child: Some(child),
            sock,
            file,
        }
    }

    fn uri(&self) -> String {
        format!("nbd:{}", self.sock.display())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory only root can write, for the secondaries' sockets.
fn socket_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("tapjail-mirror-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    d
}

fn harness(dir: &Path, respawn: bool) -> Harness {
    Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT],
        respawn,
        tenant_lines: vec![("ops", format!("mirror = {{ unix_dirs = [{dir:?}] }}"))],
        ..Options::default()
    })
}

/// A raw primary of `size` bytes filled with `pattern(seed)`.
fn primary(h: &Harness, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = h.raw_image("ops", name, size);
    std::fs::write(&p, pattern(size as usize, seed)).expect("fill primary");
    p
}

/// SM's attach: allocate, spawn, attach, open with `extra`. Returns
/// (minor, pid, device).
fn attach(h: &Harness, image: &Path, extra: &[&str]) -> (String, String, PathBuf) {
    let a = h.sm_attach(&ROOT);
    let spec = format!("aio:{}", image.display());
    h.ok(&ROOT, &a.open_args(&spec, extra));
    (a.minor, a.pid, a.dev)
}

fn stats(h: &Harness, minor: &str) -> serde_json::Value {
    let out = h.ok(&ROOT, &["stats", "-m", minor]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn mirror_state(h: &Harness, minor: &str) -> String {
    stats(h, minor)["mirror"]["state"]
        .as_str()
        .unwrap_or("-")
        .to_string()
}

/// The `mirror` of `list --json -m MINOR`'s one row (null without one).
fn list_mirror(h: &Harness, minor: &str) -> serde_json::Value {
    let out = h.ok(&ROOT, &["list", "--json", "-m", minor]);
    let rows: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    rows[0]["mirror"].clone()
}

fn wait_synced(h: &Harness, minor: &str) {
    assert!(
        eventually(Duration::from_secs(120), || mirror_state(h, minor)
            == "synced"),
        "never in sync: {}\n{}",
        stats(h, minor),
        h.broker_log()
    );
}

/// `len` bytes of `dev` at `off`, read with O_DIRECT (no page cache).
fn read_direct(dev: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(len);
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(buf.buf()).expect("read device");
    buf.buf().to_vec()
}

fn write_direct(dev: &Path, off: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_SYNC)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(data.len());
    buf.buf().copy_from_slice(data);
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(buf.buf()).expect("write device");
}

fn qemu_img_compare(primary: &Path, sec: &Secondary) -> std::process::Output {
    Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(primary)
        .arg(format!("nbd+unix:///?socket={}", sec.sock.display()))
        .output()
        .expect("qemu-img compare")
}

/// The start every mirror test shares: a raw primary of `size` bytes
/// filled with `pattern(seed)`, a `qemu-nbd` secondary in a directory the
/// tenant's `mirror` key grants, and the disk opened with `-2 URI` and
/// `extra`. `None` when a precondition is missing outside CI.
struct Mirrored {
    h: Harness,
    img: PathBuf,
    sec: Secondary,
    minor: String,
    dev: PathBuf,
    _dir: tempfile::TempDir,
    _turn: std::fs::File,
}

impl Mirrored {
    fn start(size: u64, seed: u64, respawn: bool, extra: &[&str]) -> Option<Mirrored> {
        if !preconditions() {
            return None;
        }
        let turn = fuse_loop_turn().expect("the FUSE + loop test lock");
        let dir = socket_dir();
        let h = harness(dir.path(), respawn);
        let img = primary(&h, "p.img", size, seed);
        let sec = Secondary::start(dir.path(), "s", size);
        let uri = sec.uri();
        let mut args = vec!["-2", uri.as_str()];
        args.extend_from_slice(extra);
        let (minor, _pid, dev) = attach(&h, &img, &args);
        Some(Mirrored {
            h,
            img,
            sec,
            minor,
            dev,
            _dir: dir,
            _turn: turn,
        })
    }

    /// Pause the disk and assert that primary and secondary hold the same
    /// bytes (`qemu-img compare`).
    fn pause_and_compare(&self) {
        self.h.ok(&ROOT, &["pause", "-m", &self.minor]);
        let cmp = qemu_img_compare(&self.img, &self.sec);
        assert!(
            cmp.status.success(),
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
    }
}

#[test]
fn mirror_open_2_copies_mirrors_fio_writes_and_the_secondary_compares_identical() {
    let Some(fx) = Mirrored::start(48 * MIB, 11, false, &[]) else {
        return;
    };
    let (h, _img, minor, dev, size) = (&fx.h, &fx.img, &fx.minor, &fx.dev, 48 * MIB);
    let uri = fx.sec.uri();
    let at_start = mirror_state(h, minor);
    // Verified writes over the first 64 MiB while the copy runs.
    let fio = fio_verify_writer(dev, "16M").output().expect("fio");
    assert!(
        fio.status.success(),
        "fio: {}{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    wait_synced(h, minor);
    let st = stats(h, minor);
    eprintln!(
        "mirror state when fio started: {at_start}; now {}",
        st["mirror"]
    );
    assert_eq!(st["nbd_mirror_failed"], 0, "{st}");
    assert_eq!(st["mirror"]["copied"], size, "{st}");
    assert!(
        st["mirror"]["mirrored_writes"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert_eq!(st["tap"]["errors"], 0, "{st}");
    // Quiesced, the two sides must hold the same bytes.
    fx.pause_and_compare();
    // unpause re-establishes the mirror (a fresh copy).
    h.ok(&ROOT, &["unpause", "-m", minor]);
    assert_ne!(mirror_state(h, minor), "-", "{}", stats(h, minor));
    wait_synced(h, minor);
    let lines = h.audit_lines();
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("-2 {uri}: mirroring")))),
        "the mirror is not on record"
    );
    h.ok(&ROOT, &["destroy", "-m", minor]);
}

#[test]
fn mirror_secondary_killed_midway_is_reported_and_the_primary_keeps_serving() {
    let Some(mut fx) = Mirrored::start(48 * MIB, 12, false, &[]) else {
        return;
    };
    let (h, _img, minor, dev, _size) = (&fx.h, &fx.img, &fx.minor, &fx.dev, 48 * MIB);
    let mut fio = fio_verify_writer(dev, "24M").spawn().expect("fio");
    // Once writes are being mirrored, the secondary dies.
    assert!(
        eventually(Duration::from_secs(60), || stats(h, minor)["mirror"]
            ["mirrored_writes"]
            .as_u64()
            .is_some_and(|n| n > 0)),
        "no write was mirrored: {}",
        stats(h, minor)
    );
    fx.sec.kill();
    let mut out = String::new();
    fio.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = fio.wait().expect("fio");
    assert!(
        status.success(),
        "fio saw errors after the secondary died: {out}"
    );
    let st = stats(h, minor);
    assert_eq!(st["nbd_mirror_failed"], 1, "{st}");
    assert_eq!(st["mirror"]["state"], "failed", "{st}");
    assert!(
        st["mirror"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    assert_eq!(st["tap"]["errors"], 0, "{st}");
    let m = list_mirror(h, minor);
    assert_eq!(m["state"], "failed", "list --json: {m}");
    assert_eq!(m["uri"], fx.sec.uri(), "{m}");
    assert!(m["error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
    // The primary has every byte fio wrote: read back past the dead mirror.
    let again = fio_verify_writer(dev, "8M").output().expect("fio");
    assert!(again.status.success());
    // A switch to a failed mirror is refused and the disk stays paused.
    h.ok(&ROOT, &["pause", "-m", minor]);
    let err = h.fails(&ROOT, &["unpause", "-m", minor, "-2", &fx.sec.uri()]);
    assert!(
        err.contains("not in sync") && err.contains("stays paused"),
        "{err}"
    );
    assert!(h.ok(&ROOT, &["list", "-m", minor]).contains("state=0x20"));
    // A plain unpause cannot reach the dead secondary: the disk serves
    // without the mirror, and says so on record.
    h.ok(&ROOT, &["unpause", "-m", minor]);
    assert!(read_direct(dev, 0, 4096).len() == 4096);
    let st = stats(h, minor);
    assert_eq!(
        st["nbd_mirror_failed"], 1,
        "the lost mirror must still show: {st}"
    );
    let m = list_mirror(h, minor);
    assert_eq!(m["state"], "failed", "list must show the lost mirror: {m}");
    assert!(
        m["error"]
            .as_str()
            .is_some_and(|e| e.contains("not re-established")),
        "{m}"
    );
    assert!(
        h.audit_lines().iter().any(|l| l["rule"] == "mirror-lost"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("mirror not re-established"))),
        "the lost mirror is not on record"
    );
    h.ok(&ROOT, &["destroy", "-m", minor]);
}

#[test]
fn mirror_unpause_2_switches_to_the_synced_secondary_and_reads_come_from_it() {
    let Some(fx) = Mirrored::start(16 * MIB, 13, false, &[]) else {
        return;
    };
    let (h, img, minor, dev, size) = (&fx.h, &fx.img, &fx.minor, &fx.dev, 16 * MIB);
    let uri = fx.sec.uri();
    let fresh = pattern(64 * 1024, 99);
    write_direct(dev, MIB, &fresh);
    wait_synced(h, minor);
    h.ok(&ROOT, &["pause", "-m", minor]);
    h.ok(&ROOT, &["unpause", "-m", minor, "-2", &uri]);
    // The primary is spoiled behind the disk's back: reads still show
    // what the secondary holds, so they come from it.
    std::fs::write(img, vec![0xEE; size as usize]).unwrap();
    assert_eq!(read_direct(dev, MIB, fresh.len()), fresh);
    assert_eq!(
        read_direct(dev, 4 * MIB, 4096),
        pattern(size as usize, 13)[4 * MIB as usize..4 * MIB as usize + 4096]
    );
    // Writes go to the secondary only.
    let later = pattern(4096, 7);
    write_direct(dev, 2 * MIB, &later);
    let mut s = std::fs::File::open(&fx.sec.file).unwrap();
    let mut got = vec![0; 4096];
    s.seek(SeekFrom::Start(2 * MIB)).unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, later, "the write is not on the secondary");
    let st = stats(h, minor);
    assert_eq!(st["images"][0]["name"], uri, "{st}");
    assert!(
        st["mirror"].is_null(),
        "a switched disk mirrors nothing: {st}"
    );
    h.ok(&ROOT, &["destroy", "-m", minor]);
}

#[test]
fn mirror_standby_is_not_written_and_cannot_be_switched_to() {
    let Some(fx) = Mirrored::start(16 * MIB, 14, false, &["-s"]) else {
        return;
    };
    let (h, img, minor, dev, _size) = (&fx.h, &fx.img, &fx.minor, &fx.dev, 16 * MIB);
    write_direct(dev, 0, &pattern(4096, 5));
    let st = stats(h, minor);
    assert_eq!(st["mirror"]["state"], "standby", "{st}");
    assert_eq!(st["mirror"]["mirrored_writes"], 0, "{st}");
    let m = list_mirror(h, minor);
    assert_eq!(
        (&m["mode"], &m["state"]),
        (&"standby".into(), &"standby".into()),
        "{m}"
    );
    // On a terminal: a `mirror` line under the disk's row.
    let (ok, table) = h.ctl_tty(&ROOT, &["list", "-m", minor]);
    assert!(ok, "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].ends_with(&format!("aio {}", img.display())),
        "{table}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["mirror", "standby", &fx.sec.uri()],
        "{table}"
    );
    // SM's key=value form: still one row of blktap's four fields.
    let dict = h.ok(&ROOT, &["list", "-m", minor]);
    assert_eq!(dict.lines().count(), 1, "{dict}");
    assert!(!dict.contains("mirror"), "{dict}");
    assert!(
        std::fs::read(&fx.sec.file).unwrap().iter().all(|b| *b == 0),
        "a standby secondary was written"
    );
    h.ok(&ROOT, &["pause", "-m", minor]);
    let err = h.fails(&ROOT, &["unpause", "-m", minor, "-2", &fx.sec.uri()]);
    assert!(
        err.contains("not in sync") && err.contains("standby"),
        "{err}"
    );
    assert!(h.ok(&ROOT, &["list", "-m", minor]).contains("state=0x20"));
    h.ok(&ROOT, &["unpause", "-m", minor]);
    assert_eq!(read_direct(dev, 0, 4096), pattern(4096, 5));
    h.ok(&ROOT, &["destroy", "-m", minor]);
}

#[test]
fn mirror_to_a_target_the_policy_does_not_grant_is_refused_and_audited() {
    if !preconditions() {
        return;
    }
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let granted = socket_dir();
    let elsewhere = socket_dir();
    let h = harness(granted.path(), false);
    let img = primary(&h, "p.img", 16 * MIB, 15);
    let outside = Secondary::start(elsewhere.path(), "o", 16 * MIB);
    let a = h.sm_attach(&ROOT);
    let minor = &a.minor;
    let spec = format!("aio:{}", img.display());
    let open = |uri: &str| h.fails(&ROOT, &a.open_args(&spec, &["-2", uri]));
    // A socket outside the granted directory.
    let err = open(&outside.uri());
    assert!(err.contains("may not mirror"), "{err}");
    // A symlink planted in the granted directory to that socket: the
    // policy sees a granted path, the broker's open refuses the link.
    let link = granted.path().join("link.sock");
    std::os::unix::fs::symlink(&outside.sock, &link).unwrap();
    let err = open(&format!("nbd:{}", link.display()));
    assert!(err.contains("symlinks"), "{err}");
    // A TCP target with no hosts entry, and blktap's passed-fd name form.
    assert!(open("nbd:127.0.0.1:10809").contains("may not mirror"));
    assert!(open("nbd:mirror-fd-3").contains("nbd:/path/to/socket"));
    let lines = h.audit_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["rule"] == "mirror-target" && l["decision"] == "deny"),
        "the refusal is not on record"
    );
    // Nothing was opened: the minor is still attached without an image.
    assert!(!h.ok(&ROOT, &["list", "-m", minor]).contains("args="));
    let _ = std::fs::metadata(&outside.file);
}

#[test]
fn mirror_is_reestablished_by_a_respawned_worker_and_copies_again() {
    let Some(fx) = Mirrored::start(16 * MIB, 16, true, &[]) else {
        return;
    };
    let (h, minor, dev) = (&fx.h, &fx.minor, &fx.dev);
    wait_synced(h, minor);
    let old = h.worker_pid_of(minor).expect("pid");
    let old_pid = old as i32;
    // SAFETY: kill has no memory preconditions.
    let killed = unsafe { libc::kill(old_pid, libc::SIGKILL) };
    assert_eq!(killed, 0);
    assert!(
        eventually(Duration::from_secs(60), || h
            .worker_pid_of(minor)
            .is_some_and(|p| p != old)
            && mirror_state(h, minor) != "-"),
        "no respawn: {}",
        h.broker_log()
    );
    // The new worker mirrors again (a fresh copy), and its writes reach
    // the secondary: after sync both sides compare identical.
    assert_ne!(mirror_state(h, minor), "-", "{}", stats(h, minor));
    assert!(
        h.audit_lines()
            .iter()
            .any(|l| l["rule"] == "mirror-reestablished"),
        "the re-established mirror is not on record"
    );
    write_direct(dev, 3 * MIB, &pattern(8192, 17));
    wait_synced(h, minor);
    assert_eq!(stats(h, minor)["nbd_mirror_failed"], 0);
    fx.pause_and_compare();
    h.ok(&ROOT, &["unpause", "-m", minor]);
    h.ok(&ROOT, &["destroy", "-m", minor]);
}
