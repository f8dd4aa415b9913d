//! What the tests of SM's IntelliCache leaf call share (`sm_leaf_*.rs`):
//! the SR layout SM builds (gold, its `.vhdcache` served as read cache
//! minor A, the VM's local leaf as a child of that cache, the VM's VDI on
//! the "shared SR" as a child of gold), device I/O checked against a
//! model, and offline reads and checks of the files.
#![allow(dead_code)] // each test binary uses part of it

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tapjail_tests::*;
use tapjail_testsupport::{pattern, Aligned};

pub const MIB: usize = 1 << 20;
pub const SIZE_MIB: u64 = 16;
pub const SIZE: usize = SIZE_MIB as usize * MIB;

fn run(cmd: &mut Command, input: Option<&[u8]>) -> Vec<u8> {
    let mut c = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(data) = input {
        c.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `tap-ctl ARGS` (offline tools, as root) must succeed.
pub fn run_tapctl(args: &[&str]) {
    run(Command::new(bin("tap-ctl")).args(args), None);
}

/// `tap-ctl vhd write` (offline, as root) of `data` at `offset`.
pub fn vhd_write(img: &Path, offset: usize, data: &[u8]) {
    run(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "write", "-n"])
            .arg(img)
            .args(["-o", &offset.to_string()]),
        Some(data),
    );
}

/// The whole virtual disk of `img` read offline (its chain by relative
/// locators: keep a chain in one directory).
pub fn vhd_read(img: &Path) -> Vec<u8> {
    run(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "read", "-q", "-n"])
            .arg(img)
            .args(["-o", "0", "-l", &SIZE.to_string()]),
        None,
    )
}

/// `tap-ctl vhd check` passes on `img`.
pub fn vhd_check(img: &Path) {
    run(
        Command::new(bin("tap-ctl"))
            .args(["vhd", "check", "-q", "-n"])
            .arg(img),
        None,
    );
}

/// The whole device, read with O_DIRECT (every read reaches the worker).
pub fn read_all(dev: &Path) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(MIB);
    let mut out = Vec::with_capacity(SIZE);
    while out.len() < SIZE {
        f.read_exact_at(buf.buf(), out.len() as u64)
            .expect("read device");
        out.extend_from_slice(buf.buf());
    }
    out
}

/// What the disk should read as, and which 4 KiB blocks the guest wrote
/// (the local leaf holds exactly those).
pub struct Model {
    pub data: Vec<u8>,
    pub written: Vec<bool>,
}

impl Model {
    pub fn new(data: Vec<u8>) -> Model {
        let blocks = data.len() / 4096;
        Model {
            data,
            written: vec![false; blocks],
        }
    }

    /// The guest's writes over `below` (what a file holding only the
    /// writes reads as over its parents).
    pub fn writes_over(&self, below: &[u8]) -> Vec<u8> {
        let mut out = below.to_vec();
        for (i, w) in self.written.iter().enumerate() {
            if *w {
                let r = i * 4096..(i + 1) * 4096;
                out[r.clone()].copy_from_slice(&self.data[r]);
            }
        }
        out
    }
}

/// Write `data` at `off` (4 KiB aligned) through the device (O_DIRECT,
/// then fsync) and into `model`.
pub fn write_dev(dev: &Path, model: &mut Model, off: usize, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(data.len());
    buf.buf().copy_from_slice(data);
    f.write_all_at(buf.buf(), off as u64).expect("write device");
    f.sync_all().expect("fsync device");
    model.data[off..off + data.len()].copy_from_slice(data);
    for w in &mut model.written[off / 4096..(off + data.len()).div_ceil(4096)] {
        *w = true;
    }
}

/// Read `len` bytes at `off` through the device (O_DIRECT).
pub fn read_dev(dev: &Path, off: usize, len: usize) -> Vec<u8> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut buf = Aligned::new(len);
    f.read_exact_at(buf.buf(), off as u64).expect("read device");
    buf.buf().to_vec()
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` random 4 KiB-aligned writes (4..64 KiB) and reads, each read
/// compared with the model.
pub fn random_io(dev: &Path, model: &mut Model, rng: &mut Rng, n: usize) {
    for i in 0..n {
        let len = (1 + rng.below(16) as usize) * 4096;
        let off = rng.below(((SIZE - len) / 4096) as u64) as usize * 4096;
        if rng.below(3) == 0 {
            let got = read_dev(dev, off, len);
            assert!(
                got == model.data[off..off + len],
                "read {i}: {len} bytes at {off} differ from the model"
            );
        } else {
            let data = pattern(len, rng.next() as u8 as u64);
            write_dev(dev, model, off, &data);
        }
    }
}

pub fn list(h: &Harness, t: &TenantSpec) -> Vec<serde_json::Value> {
    serde_json::from_str(&h.ok(t, &["list", "--json"])).expect("list --json")
}

pub fn entry(h: &Harness, t: &TenantSpec, minor: &str) -> serde_json::Value {
    list(h, t)
        .into_iter()
        .find(|e| e["minor"].as_u64().map(|m| m.to_string()).as_deref() == Some(minor))
        .unwrap_or_else(|| panic!("minor {minor} in list"))
}

/// SM's detach of `minor`: `close -p PID -m MINOR -t 120`, with the pid
/// of the tapdisk serving it now (a respawn changes it).
pub fn sm_close(h: &Harness, t: &TenantSpec, minor: &str) {
    let pid = entry(h, t, minor)["pid"].as_u64().expect("pid").to_string();
    h.ok(t, &["close", "-p", &pid, "-m", minor, "-t", "120"]);
}

pub fn stats(h: &Harness, t: &TenantSpec, minor: &str) -> serde_json::Value {
    let pid = entry(h, t, minor)["pid"].as_u64().expect("pid").to_string();
    serde_json::from_str(&h.ok(t, &["stats", "-p", &pid, "-m", minor])).expect("stats JSON")
}

/// The files of SM's IntelliCache layout, all in one directory (the
/// tenant's `read_cache_root`, so offline reads follow relative
/// locators), and what the disk reads as.
pub struct Sr {
    pub dir: PathBuf,
    pub gold: PathBuf,
    pub cache: PathBuf,
    pub leaf: PathBuf,
    pub vdi: PathBuf,
    /// gold's contents.
    pub gold_data: Vec<u8>,
    /// The VDI's contents before the boot: gold plus its earlier writes.
    pub vdi_data: Vec<u8>,
}

/// Policy lines for alice: the cache root SM's local SR stands for.
pub fn alice_lines() -> Vec<(&'static str, String)> {
    vec![("alice", "read_cache_root = \"{root}/sr\"".into())]
}

/// Build the layout in alice's `{root}/sr`: gold with a pattern in its
/// first half, `gold.vhdcache` (the cache), `vm.vhdcache` (the local
/// leaf, a child of the cache) and `vdi.vhd` (a child of gold holding
/// one earlier MiB at 5 MiB).
pub fn sr(h: &Harness) -> Sr {
    let dir = h.root(ALICE.name).join("sr");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    let gold = h.vhd_image(ALICE.name, "sr/gold.vhd", SIZE_MIB);
    let mut gold_data = pattern(SIZE / 2, 31);
    vhd_write(&gold, 0, &gold_data);
    gold_data.resize(SIZE, 0);
    let cache = dir.join("gold.vhdcache");
    h.vhd_snapshot(&cache, &gold);
    let leaf = dir.join("vm.vhdcache");
    h.vhd_snapshot(&leaf, &cache);
    let vdi = dir.join("vdi.vhd");
    h.vhd_snapshot(&vdi, &gold);
    let earlier = pattern(MIB, 77);
    vhd_write(&vdi, 5 * MIB, &earlier);
    let mut vdi_data = gold_data.clone();
    vdi_data[5 * MIB..6 * MIB].copy_from_slice(&earlier);
    Sr {
        dir,
        gold,
        cache,
        leaf,
        vdi,
        gold_data,
        vdi_data,
    }
}

/// The cache minor A, as SM opens it: `open -a vhd:CACHE -r`.
pub fn open_cache_minor(h: &Harness, sr: &Sr) -> Attached {
    let a = h.sm_attach(&ALICE);
    let ca = format!("vhd:{}", sr.cache.display());
    h.ok(
        &ALICE,
        &["open", "-p", &a.pid, "-m", &a.minor, "-a", &ca, "-r"],
    );
    a
}

/// SM's leaf call, normal mode: `open -a vhd:LEAF -r -e A -2 vhd:VDI`
/// (`standby` adds `-s` and drops `-r`, as SM's scratch mode).
pub fn leaf_args(d: &Attached, sr: &Sr, a: &Attached, standby: bool) -> Vec<String> {
    let mut v: Vec<String> = ["open", "-p", &d.pid, "-m", &d.minor, "-a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(format!("vhd:{}", sr.leaf.display()));
    if !standby {
        v.push("-r".into());
    }
    v.extend(["-e".into(), a.minor.clone()]);
    v.extend(["-2".into(), format!("vhd:{}", sr.vdi.display())]);
    if standby {
        v.push("-s".into());
    }
    v
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A tmpfs mounted over a directory, lazily unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tmpfs")
            .arg(dir)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Cap it at what it holds now plus `room` bytes.
    pub fn cap(&self, room: u64) {
        let c = CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs(3) with a valid path and an out struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
        let kib = (used + room).div_ceil(1024);
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(&self.0)
            .status()
            .expect("remount");
        assert!(ok.success(), "remount tmpfs to {kib} KiB");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// SIGKILL `t`'s worker on `minor` and wait (bounded) until the broker
/// serves the minor with a new one (its `restarts` went up).
pub fn kill_worker_and_await_respawn(h: &Harness, t: &TenantSpec, minor: &str) {
    let e = entry(h, t, minor);
    let (pid, restarts) = (e["pid"].as_u64().unwrap(), e["restarts"].as_u64().unwrap());
    // SAFETY: kill(2) on the worker pid the broker reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        eventually(std::time::Duration::from_secs(30), || {
            let e = entry(h, t, minor);
            e["restarts"].as_u64().is_some_and(|r| r > restarts)
                && e["pid"].as_u64().is_some_and(|p| p != pid)
        }),
        "minor {minor} was not respawned: {}\n{}",
        entry(h, t, minor),
        h.broker_log()
    );
}

/// The FUSE + loop test lock and a broker (respawn on) serving root and
/// alice with [`alice_lines`]; `None` when root or /dev/fuse is missing
/// outside CI (`require` fails the test under `CI=true`).
pub fn alice_broker() -> Option<(std::fs::File, Harness)> {
    let turn = tapjail_testsupport::fuse_loop_turn().expect("the FUSE + loop test lock");
    if !(tapjail_testsupport::require(
        tapjail_testsupport::is_root(),
        "root (loop devices, FUSE mounts, tenant uids)",
    ) && tapjail_testsupport::require(Path::new("/dev/fuse").exists(), "/dev/fuse"))
    {
        return None;
    }
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT, ALICE],
        tenant_lines: alice_lines(),
        ..Options::default()
    });
    Some((turn, h))
}
