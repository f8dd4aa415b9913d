//! `open -E` end to end: blktap's encrypted VHDs through a real tap-broker
//! (`frontend = "fuse"`), a real confined tapdisk and a loop device. The
//! data layout is checked both ways against an independent Python
//! reference (`tests/ref/blktap_crypt.py`, python3-cryptography): what the
//! worker wrote decrypts there, and what the reference encrypted reads back
//! through the device. The key must appear in no log, audit line or reply.
//! Needs root, /dev/fuse, loop devices and python3-cryptography.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, require};

const SALT_WORKER: u64 = 0x5a5a_0001;
const SALT_REFERENCE: u64 = 0x7e7e_0002;

/// Sector `s` of a pattern, as the reference makes it.
fn pattern(s: u64, salt: u64) -> Vec<u8> {
    (s ^ salt).to_le_bytes().repeat(64)
}

fn pattern_run(first: u64, count: u64, salt: u64) -> Vec<u8> {
    (first..first + count)
        .flat_map(|s| pattern(s, salt))
        .collect()
}

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ref/blktap_crypt.py")
}

fn python_has_cryptography() -> bool {
    Command::new("python3")
        .args(["-c", "import cryptography.hazmat.primitives.ciphers"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Run the reference; true when it exits 0.
fn reference_says(args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(reference())
        .args(args)
        .output()
        .expect("python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The reference's `check` (sectors decrypt to the pattern) or `put`
/// (encrypt the pattern into them) on sectors `first..first + count`.
fn reference_sectors(
    verb: &str,
    img: &Path,
    keyfile: &Path,
    first: u64,
    count: u64,
    salt: u64,
) -> (bool, String) {
    let (img, keyfile) = (img.to_str().unwrap(), keyfile.to_str().unwrap());
    let (first, count, salt) = (first.to_string(), count.to_string(), salt.to_string());
    reference_says(&[verb, img, keyfile, &first, &count, &salt])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

struct Disk {
    pid: String,
    dev: PathBuf,
}

/// allocate, spawn, attach: the SM sequence before `open`.
fn prepare(h: &Harness, outputs: &mut Vec<Output>) -> Disk {
    let dev = PathBuf::from(h.ok(&ROOT, &["allocate"]).trim());
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    let o = h.ctl(&ROOT, &["attach", "-p", &pid, "-m", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    outputs.push(o);
    Disk { pid, dev }
}

fn open_e(h: &Harness, d: &Disk, img: &Path, key: &[u8]) -> Output {
    h.ctl_input(
        &ROOT,
        &[
            "open",
            "-p",
            &d.pid,
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", img.display()),
            "-E",
        ],
        key,
    )
}

fn close(h: &Harness, d: &Disk, outputs: &mut Vec<Output>) {
    let o = h.ctl(&ROOT, &["close", "-p", &d.pid, "-m", "0"]);
    assert!(o.status.success(), "close: {}", text(&o));
    outputs.push(o);
}

#[test]
fn fuse_crypt_open_e_reads_and_writes_blktaps_layout_and_never_shows_the_key() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    if !require(
        python_has_cryptography(),
        "python3-cryptography (the independent reference; .ci/deps installs it)",
    ) {
        return;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE],
        tenant_lines: vec![("alice", "encryption = false".into())],
        ..Options::default()
    });
    let img = h.vhd_image(ROOT.name, "enc.vhd", 8);
    let mut key = [0u8; 64];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
    let keyfile = h.root(ROOT.name).join("key");
    fs::write(&keyfile, key).unwrap();
    let set = Command::new(bin("tap-ctl"))
        .args(["vhd", "key", "-s", "-n"])
        .arg(&img)
        .arg("-k")
        .arg(&keyfile)
        .output()
        .unwrap();
    assert!(set.status.success(), "vhd key -s: {}", text(&set));
    let (ok, why) = reference_says(&["keyhash", img.to_str().unwrap(), keyfile.to_str().unwrap()]);
    assert!(ok, "the reference does not accept our keyhash: {why}");

    let mut outputs = Vec::new();
    let d = prepare(&h, &mut outputs);

    // No key on an encrypted image: refused, the minor stays closed.
    let o = h.ctl(
        &ROOT,
        &[
            "open",
            "-p",
            &d.pid,
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", img.display()),
        ],
    );
    assert!(!o.status.success(), "opened without a key");
    assert!(
        text(&o).contains("encrypted") && text(&o).contains("-E"),
        "{}",
        text(&o)
    );
    outputs.push(o);

    // A wrong key: refused with a clear message.
    let mut wrong = key;
    wrong[0] ^= 1;
    let o = open_e(&h, &d, &img, &wrong);
    assert!(!o.status.success(), "opened with a wrong key");
    assert!(text(&o).contains("does not match"), "{}", text(&o));
    outputs.push(o);

    // A key of a size blktap does not take never leaves tap-ctl.
    let o = open_e(&h, &d, &img, &key[..40]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("32") && text(&o).contains("64"),
        "{}",
        text(&o)
    );
    outputs.push(o);

    // Policy: alice may not use -E at all.
    let o = h.ctl_input(
        &ALICE,
        &[
            "open",
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", img.display()),
            "-E",
        ],
        &key,
    );
    assert!(!o.status.success(), "alice's -E was allowed");
    assert!(text(&o).contains("encryption = false"), "{}", text(&o));
    outputs.push(o);

    // The right key: write through the device.
    let o = open_e(&h, &d, &img, &key);
    assert!(
        o.status.success(),
        "open -E: {}\n{}",
        text(&o),
        h.broker_log()
    );
    outputs.push(o);
    let first_block = pattern_run(0, 16, SALT_WORKER);
    let second_block = pattern_run(4096, 8, SALT_WORKER);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.dev)
            .unwrap();
        f.write_all_at(&first_block, 0).unwrap();
        f.write_all_at(&second_block, 4096 * 512).unwrap();
        // An unaligned write: read-modify-write of encrypted sectors.
        f.write_all_at(b"tapjail", 4096 * 512 + 100).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; first_block.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == first_block, "read back differs before close");
    }
    close(&h, &d, &mut outputs);

    // The image file holds no sector of plaintext we wrote.
    let file = fs::read(&img).unwrap();
    for s in 0..16 {
        assert!(
            !contains(&file, &pattern(s, SALT_WORKER)),
            "sector {s} is plaintext in the file"
        );
    }
    // The reference decrypts what the worker wrote (the unaligned write
    // changed sector 4096 only).
    let (ok, why) = reference_sectors("check", &img, &keyfile, 0, 16, SALT_WORKER);
    assert!(
        ok,
        "the reference cannot read the worker's sectors 0..16: {why}"
    );
    let (ok, why) = reference_sectors("check", &img, &keyfile, 4097, 7, SALT_WORKER);
    assert!(
        ok,
        "the reference cannot read the worker's sectors 4097..4104: {why}"
    );
    // The reference encrypts sectors 8..16; the worker must read them.
    let (ok, why) = reference_sectors("put", &img, &keyfile, 8, 8, SALT_REFERENCE);
    assert!(ok, "reference put: {why}");

    // Reopen with the key: both sides' data intact.
    let o = open_e(&h, &d, &img, &key);
    assert!(o.status.success(), "reopen -E: {}", text(&o));
    outputs.push(o);
    {
        let f = OpenOptions::new().read(true).open(&d.dev).unwrap();
        let mut back = vec![0u8; 16 * 512];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back[..8 * 512] == first_block[..8 * 512],
            "worker's sectors 0..8 differ after reopen"
        );
        assert!(
            back[8 * 512..] == pattern_run(8, 8, SALT_REFERENCE)[..],
            "the reference's sectors 8..16 do not read back through the worker"
        );
        let mut s = vec![0u8; 512];
        f.read_exact_at(&mut s, 4096 * 512).unwrap();
        let mut want = pattern(4096, SALT_WORKER);
        want[100..107].copy_from_slice(b"tapjail");
        assert!(s == want, "the read-modify-written sector differs");
        let mut hole = vec![1u8; 4096];
        f.read_exact_at(&mut hole, 1 << 20).unwrap();
        assert!(
            hole.iter().all(|&b| b == 0),
            "an unwritten sector of an allocated block is not zero"
        );
    }
    close(&h, &d, &mut outputs);

    // The key is nowhere: audit log, broker (and forwarded worker) log,
    // any tap-ctl output.
    let audit = fs::read(&h.audit).expect("the audit log");
    let mut hay: Vec<Vec<u8>> = outputs
        .iter()
        .flat_map(|o| [o.stdout.clone(), o.stderr.clone()])
        .collect();
    hay.push(h.broker_log().into_bytes());
    hay.push(audit);
    for l in h.audit_lines() {
        hay.push(l.to_string().into_bytes());
    }
    let lower = hex(&key);
    let upper = lower.to_uppercase();
    for (i, text) in hay.iter().enumerate() {
        assert!(!contains(text, &key[..16]), "key bytes in output #{i}");
        assert!(
            !contains(text, &lower.as_bytes()[..32]),
            "key hex in output #{i}"
        );
        assert!(
            !contains(text, &upper.as_bytes()[..32]),
            "key HEX in output #{i}"
        );
    }
    // The audit says a key was given, and its size.
    assert!(
        h.audit_lines().iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("-E: 64-byte key"))),
        "the -E open is not on record"
    );
}

/// The broker keeps an `-E` key for the disk's life: a worker killed
/// under an encrypted disk is respawned, given the key again, and the
/// disk reads what was written (from the image, not a cache).
#[test]
fn fuse_crypt_a_respawned_worker_gets_the_key_again_and_reads_the_data() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let img = h.vhd_image(ROOT.name, "respawn.vhd", 8);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    // The key from stdin (`-k -`), a 32-byte AES-128-XTS key.
    let mut set = Command::new(bin("tap-ctl"))
        .args(["vhd", "key", "-s", "-k", "-", "-n"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), &key).unwrap();
    assert!(set.wait().unwrap().success(), "vhd key -s -k -");
    let mut outputs = Vec::new();
    let d = prepare(&h, &mut outputs);
    let o = open_e(&h, &d, &img, &key);
    assert!(o.status.success(), "open -E: {}", text(&o));
    let data = pattern_run(0, 64, SALT_WORKER);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.dev)
            .unwrap();
        f.write_all_at(&data, 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let first: i32 = d.pid.parse().unwrap();
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    assert!(
        eventually(std::time::Duration::from_secs(30), || {
            h.worker_pid_of("0").is_some_and(|p| p.to_string() != d.pid)
                && h.ok(&ROOT, &["list", "-m", "0"]).contains("state=0")
        }),
        "no respawn with the key: {}\n{}",
        h.ok(&ROOT, &["list"]),
        h.broker_log()
    );
    let flushed = Command::new("blockdev")
        .arg("--flushbufs")
        .arg(&d.dev)
        .status()
        .unwrap();
    assert!(flushed.success(), "blockdev --flushbufs");
    let f = OpenOptions::new().read(true).open(&d.dev).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "the respawned worker reads other bytes");
    drop(f);
    let o = h.ctl(&ROOT, &["close", "-m", "0"]);
    assert!(o.status.success(), "close: {}", text(&o));
    let log = h.broker_log().into_bytes();
    assert!(!contains(&log, &key[..16]), "key bytes in the broker log");
    assert!(
        !contains(&log, &hex(&key).as_bytes()[..32]),
        "key hex in the broker log"
    );
}
