//! Changed-block tracking through a real broker and worker on the NBD
//! frontend: a full backup with qemu-img, writes, an incremental backup of
//! only the blocks `qemu-img map` reads as dirty from
//! `qemu:dirty-bitmap:NAME`, and a restore of both that is byte-identical
//! to the disk; again with the worker SIGKILLed in the middle of the
//! writes, and across a broker crash. Policy refusals and audit records.

use crate::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const GRAN: u64 = 64 * 1024;
const SIZE: u64 = 16 << 20;

fn json_rows(h: &Harness, t: &TenantSpec) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&h.ok(t, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a worker pid this test created through the broker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn need_qemu() -> bool {
    tapjail_testsupport::require(
        Command::new("qemu-img").arg("--version").output().is_ok()
            && Command::new("qemu-io").arg("--version").output().is_ok(),
        "qemu-img and qemu-io are needed (apt install qemu-utils)",
    )
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}\n--- broker log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        broker_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn broker_log() -> String {
    BROKER_LOG.with(|l| {
        l.borrow()
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    })
}

thread_local! {
    /// The running test's broker log, shown when a tool fails.
    static BROKER_LOG: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

fn url(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// The bitmaps of minor 0, from `tap-ctl cbt list --json`.
fn bitmaps(h: &Harness) -> Vec<serde_json::Value> {
    let out = h.ok(&ALICE, &["cbt", "list", "-m", "0", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Dirty extents `(start, length)` of bitmap `name` as qemu reads them.
/// qemu maps a dirty bitmap's flag 1 onto its "hole" bit, so `qemu-img
/// map` shows dirty ranges as `"data": false`.
fn dirty_extents(sock: &Path, name: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let map = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// A deterministic list of writes: (offset, length, pattern byte).
fn writes(seed: u64, n: usize) -> Vec<(u64, u64, u8)> {
    let mut s = seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|i| {
            let len = 4096 * (1 + next() % 16);
            let off = (next() % ((SIZE - len) / 4096)) * 4096;
            (off, len, 0x20 + (i % 90) as u8)
        })
        .collect()
}

fn qemu_io_writes(sock: &Path, w: &[(u64, u64, u8)]) -> std::process::Child {
    qemu_io_paced(sock, w, None)
}

/// qemu-io writing `w`, idle for `pause_ms` after the first half (so that
/// a test can act between two writes it knows about).
fn qemu_io_paced(sock: &Path, w: &[(u64, u64, u8)], pause_ms: Option<u64>) -> std::process::Child {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (i, (off, len, p)) in w.iter().enumerate() {
        if i == w.len() / 2 {
            if let Some(ms) = pause_ms {
                cmd.args(["-c", &format!("sleep {ms}")]);
            }
        }
        cmd.args(["-c", &format!("write -P {p} {off} {len}")]);
    }
    cmd.arg(url(sock))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io")
}

/// The writes qemu-io reports done ("wrote LEN/LEN bytes at offset OFF").
fn acknowledged(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("wrote ")?;
            let (len, rest) = rest.split_once('/')?;
            let off = rest.split("at offset ").nth(1)?;
            Some((off.trim().parse().ok()?, len.parse().ok()?))
        })
        .collect()
}

fn covered(extents: &[(u64, u64)], off: u64, len: u64) -> bool {
    (off / GRAN..=(off + len - 1) / GRAN).all(|b| {
        extents
            .iter()
            .any(|&(s, l)| s <= b * GRAN && (b + 1) * GRAN <= s + l)
    })
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies):
/// the incremental backup reads every dirty extent over one connection.
struct NbdReader(std::os::unix::net::UnixStream);

impl NbdReader {
    fn connect(sock: &Path) -> NbdReader {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&6u32.to_be_bytes());
        opt.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // default export, no infos
        s.write_all(&opt).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            assert!(kind < 1 << 31, "NBD_OPT_GO refused: {kind:#x}");
            if kind == 1 {
                return NbdReader(s);
            }
        }
    }

    fn read(&mut self, off: u64, len: u32) -> Vec<u8> {
        use std::io::{Read, Write};
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&[0, 0, 0, 0]); // flags, NBD_CMD_READ
        r.extend_from_slice(&off.to_be_bytes()); // handle
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        if let Err(e) = self.0.read_exact(&mut h) {
            panic!(
                "read {off}+{len}: {e}\n--- broker log ---\n{}",
                broker_log()
            );
        }
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "read {off}+{len} failed");
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        data
    }
}

/// Copy the dirty extents out of the disk into `restored`, which holds
/// the full backup; the bytes copied.
fn apply_incremental(sock: &Path, extents: &[(u64, u64)], restored: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(restored)
        .unwrap();
    let mut nbd = NbdReader::connect(sock);
    let mut copied = 0;
    for &(start, len) in extents {
        assert_eq!(start % GRAN, 0, "extents are whole blocks: {extents:?}");
        let mut at = start;
        while at < start + len {
            // Small reads: a worker here has only a few MiB of lockable
            // memory (RLIMIT_MEMLOCK), and each I/O thread keeps what it
            // allocated.
            let n = (start + len - at).min(16 * 1024);
            let data = nbd.read(at, n as u32);
            target.write_all_at(&data, at).unwrap();
            copied += n;
            at += n;
        }
    }
    copied
}

fn full_backup(sock: &Path, to: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url(sock),
            to.to_str().unwrap(),
        ],
    );
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {at}", a.display(), b.display());
    }
}

struct Setup {
    h: Harness,
    sock: PathBuf,
    image: PathBuf,
    scratch: tempfile::TempDir,
}

fn setup(respawn: bool) -> Setup {
    let h = Harness::start(Options {
        respawn,
        ..Options::default()
    });
    // `cbt start` creates the log with her credentials: her root is hers.
    h.own(&h.root("alice"));
    let img = h.raw_image("alice", "disk.img", SIZE);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    BROKER_LOG.with(|l| *l.borrow_mut() = Some(h.log.clone()));
    let scratch = tempfile::tempdir().unwrap();
    Setup {
        h,
        sock,
        image: img,
        scratch,
    }
}

/// Full backup, checkpoint, writes (with `during` run once some are
/// acknowledged), incremental of the dirty blocks only, restore.
fn backup_round(s: &Setup, seed: u64, during: impl FnOnce(u64)) {
    let (h, sock, dir) = (&s.h, &s.sock, s.scratch.path());
    let full = dir.join("full.raw");
    full_backup(sock, &full);
    h.ok(&ALICE, &["cbt", "checkpoint", "-m", "0", "--name", "inc"]);
    assert_eq!(bitmaps(h)[0]["dirty"], 0, "a checkpoint clears the bitmap");
    let ws = writes(seed, 48);
    let (first, second) = ws.split_at(24);
    let done = qemu_io_writes(sock, first).wait_with_output().unwrap();
    let mut acked = acknowledged(&String::from_utf8_lossy(&done.stdout));
    assert_eq!(acked.len(), first.len(), "{done:?}");
    // The second batch runs while `during` happens (a worker kill): what
    // qemu-io acknowledged is what the bitmap must cover.
    let before = bitmaps(h)[0]["dirty"].as_u64().unwrap();
    let child = qemu_io_paced(sock, second, Some(5000));
    during(before);
    let out = child.wait_with_output().unwrap();
    acked.extend(acknowledged(&String::from_utf8_lossy(&out.stdout)));
    // A respawned worker serves the same socket: the writes qemu-io lost
    // with the killed connection are made again, as a reconnecting
    // client would.
    let missing: Vec<_> = second
        .iter()
        .filter(|(o, l, _)| !acked.contains(&(*o, *l)))
        .copied()
        .collect();
    if !missing.is_empty() {
        let again = qemu_io_writes(sock, &missing).wait_with_output().unwrap();
        acked.extend(acknowledged(&String::from_utf8_lossy(&again.stdout)));
    }
    let dirty = dirty_extents(sock, "inc");
    for &(off, len) in &acked {
        assert!(
            covered(&dirty, off, len),
            "acknowledged write {off}+{len} is not in the bitmap {dirty:?}\n{}",
            h.broker_log()
        );
    }
    let blocks: std::collections::BTreeSet<u64> = acked
        .iter()
        .flat_map(|&(o, l)| o / GRAN..=(o + l - 1) / GRAN)
        .collect();
    let listed = bitmaps(h)[0]["dirty"].as_u64().unwrap();
    assert_eq!(listed, blocks.len() as u64, "exactly the written blocks");
    let restored = dir.join("restored.raw");
    std::fs::copy(&full, &restored).unwrap();
    let copied = apply_incremental(sock, &dirty, &restored);
    assert_eq!(copied, blocks.len() as u64 * GRAN, "only the dirty blocks");
    assert!(copied < SIZE / 4, "an incremental, not a full copy");
    // The disk itself: the raw image file (the worker writes it with
    // O_DIRECT and the writes above were acknowledged).
    assert_same(&restored, &s.image);
}

#[test]
fn cbt_incremental_backup_over_nbd_restores_the_disk_byte_for_byte() {
    if !need_qemu() {
        return;
    }
    let s = setup(false);
    s.h.ok(&ALICE, &["cbt", "start", "-m", "0", "--name", "inc"]);
    let m = bitmaps(&s.h);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["name"], "inc");
    assert_eq!(m[0]["granularity"], GRAN);
    assert_eq!(m[0]["blocks"], SIZE / GRAN);
    let table = s.h.ok(&ALICE, &["cbt", "list", "-m", "0"]);
    assert!(table.lines().nth(1).unwrap().starts_with("inc "), "{table}");
    // The log is a blktap CBT log next to the image, the tenant's own.
    let log = s.h.root("alice").join("disk.img.inc.cbt");
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), ALICE.uid);
    assert_eq!(meta.len(), 48 + SIZE / GRAN / 8);
    backup_round(&s, 0x5eed, |_| {});
    s.h.ok(&ALICE, &["cbt", "stop", "-m", "0", "--name", "inc"]);
    assert!(bitmaps(&s.h).is_empty());
    let lines = s.h.audit_lines();
    for op in ["start", "checkpoint", "stop", "list"] {
        assert!(
            lines.iter().any(|l| l["request"]
                .to_string()
                .contains(&format!("\"op\":\"{}\"", capital(op)))
                && l["outcome"].is_string()),
            "no audited cbt {op}"
        );
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next().unwrap().to_uppercase().chain(c).collect()
}

#[test]
fn cbt_bitmap_covers_every_acknowledged_write_across_a_worker_sigkill() {
    if !need_qemu() {
        return;
    }
    let s = setup(true);
    s.h.ok(&ALICE, &["cbt", "start", "-m", "0", "--name", "inc"]);
    backup_round(&s, 0xdead, |before| {
        // Kill once the second batch is writing: some of its blocks are
        // marked (more than the first batch's), the rest still to come.
        assert!(
            eventually(Duration::from_secs(20), || bitmaps(&s.h)[0]["dirty"]
                .as_u64()
                .unwrap()
                > before),
            "the second batch never wrote"
        );
        let pid = json_rows(&s.h, &ALICE)[0]["pid"].as_u64().unwrap() as u32;
        sigkill(pid);
        assert!(
            eventually(Duration::from_secs(20), || {
                let r = json_rows(&s.h, &ALICE);
                r[0]["state"] == 0 && r[0]["pid"].as_u64() != Some(u64::from(pid))
            }),
            "no respawn: {}",
            s.h.broker_log()
        );
    });
    assert!(
        s.h.broker_log().contains("CBT log inc"),
        "{}",
        s.h.broker_log()
    );
}

#[test]
fn cbt_bitmap_survives_a_broker_crash_and_a_respawn_under_the_new_broker() {
    if !need_qemu() {
        return;
    }
    let mut s = setup(true);
    s.h.ok(&ALICE, &["cbt", "start", "-m", "0", "--name", "inc"]);
    let ws = writes(7, 10);
    let out = qemu_io_writes(&s.sock, &ws).wait_with_output().unwrap();
    let acked = acknowledged(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(acked.len(), 10);
    let dirty = bitmaps(&s.h)[0]["dirty"].as_u64().unwrap();
    s.h.crash();
    s.h.launch();
    assert_eq!(
        bitmaps(&s.h)[0]["dirty"],
        dirty,
        "the adopted worker kept it"
    );
    let pid = json_rows(&s.h, &ALICE)[0]["pid"].as_u64().unwrap() as u32;
    sigkill(pid);
    assert!(eventually(Duration::from_secs(20), || {
        let r = json_rows(&s.h, &ALICE);
        r[0]["state"] == 0 && r[0]["pid"].as_u64() != Some(u64::from(pid))
    }));
    assert_eq!(
        bitmaps(&s.h)[0]["dirty"],
        dirty,
        "the new broker handed the log to the respawned worker"
    );
    let ext = dirty_extents(&s.sock, "inc");
    for (off, len) in acked {
        assert!(covered(&ext, off, len), "{off}+{len} lost: {ext:?}");
    }
}

#[test]
fn cbt_refused_by_policy_and_for_other_tenants_is_audited() {
    let h = Harness::start(Options {
        tenant_lines: vec![("bob", "cbt = false".into())],
        ..Options::default()
    });
    let img = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    let bimg = h.raw_image("bob", "b.img", 1 << 20);
    h.ok(&BOB, &["create", "-a", &format!("aio:{}", bimg.display())]);
    let err = h.fails(&BOB, &["cbt", "start", "-m", "1", "--name", "x"]);
    assert!(err.contains("cbt = false"), "{err}");
    assert!(!h.root("bob").join("b.img.x.cbt").exists());
    let err = h.fails(&BOB, &["cbt", "start", "-m", "0", "--name", "x"]);
    assert!(err.contains("does not belong"), "{err}");
    let err = h.fails(&ALICE, &["cbt", "start", "-m", "0", "--name", "../x"]);
    assert!(err.contains("bitmap name"), "{err}");
    assert!(!h.root("alice").join("x.cbt").exists());
    let lines = h.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l["rule"] == "cbt" && l["decision"] == "deny"));
    assert!(lines
        .iter()
        .any(|l| l["rule"] == "foreign-minor" && l["decision"] == "deny"));
}

/// blktap's CBT log, read from the spec (`include/cbt-util.h`) without the
/// worker's code: 48-byte header (parent and child UUIDs, `int consistent`,
/// padding, `u64 size`, little-endian as x86 writes the struct), then one
/// bit per 64 KiB block, bit `n % 8` of byte `n / 8`.
struct BlktapLog {
    parent: [u8; 16],
    consistent: i32,
    size: u64,
    bits: Vec<u8>,
}

impl BlktapLog {
    fn create(path: &Path, size: u64, parent: [u8; 16], consistent: i32) {
        let mut b = parent.to_vec();
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&consistent.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&size.to_le_bytes());
        b.resize(48 + size.div_ceil(GRAN).div_ceil(8) as usize, 0);
        std::fs::write(path, b).unwrap();
    }

    fn read(path: &Path) -> BlktapLog {
        let b = std::fs::read(path).unwrap();
        let size = u64::from_le_bytes(b[40..48].try_into().unwrap());
        assert_eq!(b.len() as u64, 48 + size.div_ceil(GRAN).div_ceil(8));
        BlktapLog {
            parent: b[..16].try_into().unwrap(),
            consistent: i32::from_le_bytes(b[32..36].try_into().unwrap()),
            size,
            bits: b[48..].to_vec(),
        }
    }

    fn dirty(&self) -> Vec<u64> {
        (0..self.size.div_ceil(GRAN))
            .filter(|n| self.bits[(n / 8) as usize] & (1 << (n % 8)) != 0)
            .collect()
    }
}

/// `cbt-util get -n LOG -f|-s|-b`, when `CBT_UTIL` names blktap's own tool
/// built from source (a local check only: CI has no such binary).
fn cbt_util(log: &Path, what: &str) -> Option<Vec<u8>> {
    let tool = std::env::var_os("CBT_UTIL")?;
    let out = Command::new(tool)
        .args(["get", "-n", log.to_str().unwrap(), what])
        .output()
        .expect("CBT_UTIL runs");
    assert!(out.status.success(), "{out:?}");
    Some(out.stdout)
}

/// The SM way: spawn, attach, open with flags; the minor number.
fn sm_open(h: &Harness, image: &Path, flags: &[&str]) -> (String, String) {
    let a = h.sm_attach(&ALICE);
    let spec = format!("aio:{}", image.display());
    h.ok(&ALICE, &a.open_args(&spec, flags));
    (a.minor, a.pid)
}

#[test]
fn cbt_open_c_and_unpause_c_write_blktaps_log_format() {
    if !need_qemu() {
        return;
    }
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "vdi.img", SIZE);
    let log = h.root("alice").join("vdi.cbtlog");
    // SM creates the log (cbt-util create), marks it inconsistent while the
    // VDI is attached, and sets UUIDs; tapdisk only sets bits.
    BlktapLog::create(&log, SIZE, [0xab; 16], 0);
    h.own(&log);
    let (minor, pid) = sm_open(&h, &img, &["-C", log.to_str().unwrap()]);
    let sock = std::fs::read_link(h.devices.join(format!("tapdev{minor}"))).unwrap();
    let ws = [
        (0u64, 4096u64, 1u8),
        (5 * GRAN + 100 * 512, 2 * GRAN, 2),
        (SIZE - 512, 512, 3),
    ];
    let out = qemu_io_writes(&sock, &ws).wait_with_output().unwrap();
    assert_eq!(acknowledged(&String::from_utf8_lossy(&out.stdout)).len(), 3);
    let l = BlktapLog::read(&log);
    let last = SIZE / GRAN - 1;
    assert_eq!(l.dirty(), vec![0, 5, 6, 7, last]);
    assert_eq!(
        (l.parent, l.consistent, l.size),
        ([0xab; 16], 0, SIZE),
        "header is SM's"
    );
    let listed = h.ok(&ALICE, &["cbt", "list", "-m", &minor, "--json"]);
    assert!(
        listed.contains("\"xapi_log\":true") && listed.contains("xapi-cbt-log"),
        "{listed}"
    );
    if let Some(bitmap) = cbt_util(&log, "-b") {
        assert_eq!(bitmap, l.bits, "blktap's cbt-util reads the same bitmap");
        assert_eq!(
            cbt_util(&log, "-s").unwrap(),
            format!("{SIZE}\n").into_bytes()
        );
        assert_eq!(cbt_util(&log, "-f").unwrap(), b"0\n");
    }
    // Pause, unpause onto a new log (-c): later writes go there only.
    let log2 = h.root("alice").join("vdi2.cbtlog");
    BlktapLog::create(&log2, SIZE, [0xcd; 16], 0);
    h.own(&log2);
    h.ok(&ALICE, &["pause", "-p", &pid, "-m", &minor]);
    h.ok(
        &ALICE,
        &[
            "unpause",
            "-p",
            &pid,
            "-m",
            &minor,
            "-c",
            log2.to_str().unwrap(),
        ],
    );
    let out = qemu_io_writes(&sock, &[(9 * GRAN, 512, 4)])
        .wait_with_output()
        .unwrap();
    assert_eq!(acknowledged(&String::from_utf8_lossy(&out.stdout)).len(), 1);
    assert_eq!(BlktapLog::read(&log2).dirty(), vec![9]);
    assert_eq!(
        BlktapLog::read(&log).dirty(),
        vec![0, 5, 6, 7, last],
        "the old log is left"
    );
    let lines = h.audit_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["request"].to_string().contains("vdi2.cbtlog")),
        "unpause -c is on record"
    );
}

#[test]
fn cbt_open_c_outside_the_tenants_roots_or_on_a_hostile_log_is_refused() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "vdi.img", SIZE);
    // Bob's file, and a file outside every root: alice's worker must get
    // neither, even though the broker (root) could open both.
    let bobs = h.root("bob").join("b.cbtlog");
    BlktapLog::create(&bobs, SIZE, [0; 16], 0);
    h.own(&bobs);
    let outside = h.dir.path().join("outside.cbtlog");
    BlktapLog::create(&outside, SIZE, [0; 16], 0);
    for (log, words) in [(&bobs, "outside"), (&outside, "outside")] {
        let a = h.sm_attach(&ALICE);
        let (minor, pid) = (&a.minor, &a.pid);
        let spec = format!("aio:{}", img.display());
        let err = h.fails(&ALICE, &a.open_args(&spec, &["-C", log.to_str().unwrap()]));
        assert!(err.contains(words), "{err}");
        // Nothing is served: the open failed as a whole.
        assert!(
            !h.ok(&ALICE, &["list", "-m", minor]).contains("args="),
            "{minor}"
        );
        h.ok(&ALICE, &["detach", "-p", pid, "-m", minor]);
        h.ok(&ALICE, &["free", "-m", minor]);
    }
    // A log of alice's whose header claims a huge disk is refused by the
    // worker (which alone parses it); the open fails and says why.
    let hostile = h.root("alice").join("hostile.cbtlog");
    let mut b = vec![0u8; 48];
    b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&hostile, &b).unwrap();
    h.own(&hostile);
    let a = h.sm_attach(&ALICE);
    let minor = &a.minor;
    let spec = format!("aio:{}", img.display());
    let err = h.fails(
        &ALICE,
        &a.open_args(&spec, &["-C", hostile.to_str().unwrap()]),
    );
    assert!(
        err.contains("CBT log") && err.contains("more than"),
        "{err}"
    );
    assert!(!h.ok(&ALICE, &["list", "-m", minor]).contains("args="));
    let lines = h.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l["request"].to_string().contains("outside.cbtlog")));
}
