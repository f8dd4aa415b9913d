//! Helpers shared by the end-to-end tests: a real `tap-broker` in a temp
//! directory with a test policy, `tap-ctl` run as test tenants (a child
//! process that drops to the tenant's uid/gid before connecting, so the
//! test runner itself never changes identity), a pty for the terminal
//! output format, and readers for the audit log.
//!
//! The binaries are taken from the cargo target directory the tests were
//! built into (`cargo build --workspace --bins`, which `cargo test
//! --workspace` and `cargo nextest run --workspace` do).

pub mod sm;
pub mod soak;
pub use sm::Attached;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`, where cargo put this workspace's binaries.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Which tapdisk the broker under test spawns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerBin {
    /// The real, confined `tapdisk`.
    Real,
    /// `fake-tapdisk` (tests/src/bin), for forcing worker behaviours.
    Fake,
    /// `fake-tapdisk` leaving out one confinement step the broker checks
    /// from outside: `"hostns"` (stays in the host's net and mount
    /// namespaces), `"rootns"` (a mount namespace of its own instead of
    /// the broker's empty root), `"dumpable"` (dumpable after its uid switch), `"uid"`
    /// (keeps root's uid and capabilities), `"nnp"` (no no_new_privs, so no
    /// seccomp filter either) or `"seccomp"` (no seccomp filter). Run
    /// through a symlink whose name tells the fake which.
    FakeSkipping(&'static str),
}

impl WorkerBin {
    pub fn path(self) -> PathBuf {
        match self {
            WorkerBin::Real => bin("tapdisk"),
            WorkerBin::Fake | WorkerBin::FakeSkipping(_) => bin("fake-tapdisk"),
        }
    }
}

/// A test tenant.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    pub writable: bool,
    pub max_disks: u32,
    pub admin: bool,
}

pub const ALICE: TenantSpec = TenantSpec {
    name: "alice",
    uid: 4242,
    gid: 4242,
    writable: true,
    max_disks: 4,
    admin: false,
};
pub const BOB: TenantSpec = TenantSpec {
    name: "bob",
    uid: 4343,
    gid: 4343,
    writable: true,
    max_disks: 4,
    admin: false,
};
/// Read-only tenant.
pub const CAROL: TenantSpec = TenantSpec {
    name: "carol",
    uid: 4444,
    gid: 4444,
    writable: false,
    max_disks: 2,
    admin: false,
};
/// Root, as an admin tenant (root is special only because this says so).
pub const ROOT: TenantSpec = TenantSpec {
    name: "ops",
    uid: 0,
    gid: 0,
    writable: true,
    max_disks: 256,
    admin: true,
};
/// Matches no tenant.
pub const NOBODY: (u32, u32) = (4545, 4545);

#[derive(Debug, Clone)]
pub struct Options {
    pub worker: WorkerBin,
    /// The policy's `frontend` (`nbd` unless a test needs another).
    pub frontend: &'static str,
    pub tenants: Vec<TenantSpec>,
    pub respawn: bool,
    pub worker_timeout_secs: u32,
    pub extra: String,
    /// Lines added to a tenant's `[[tenant]]` block: (tenant name, TOML);
    /// `{root}` in them becomes the tenant's image root.
    pub tenant_lines: Vec<(&'static str, String)>,
    /// Environment of tap-broker beyond the runner's (whose `TAPJAIL_LOG`,
    /// `RUST_LOG`, `TAPJAIL_LOG_FORMAT` and `JOURNAL_STREAM` are removed,
    /// so the broker logs JSON lines at `info` unless a test says).
    pub env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            worker: default_worker(),
            frontend: "nbd",
            tenants: vec![ROOT, ALICE, BOB, CAROL],
            respawn: false,
            worker_timeout_secs: 10,
            extra: String::new(),
            tenant_lines: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The worker the lifecycle tests use: the real tapdisk, unless
/// `TAPJAIL_TEST_WORKER=fake` (to tell a broker bug from a worker bug).
pub fn default_worker() -> WorkerBin {
    match std::env::var("TAPJAIL_TEST_WORKER").as_deref() {
        Ok("fake") => WorkerBin::Fake,
        _ => WorkerBin::Real,
    }
}

/// A running broker in its own temp directory.
#[derive(Debug)]
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub audit: PathBuf,
    pub state: PathBuf,
    pub devices: PathBuf,
    pub policy: PathBuf,
    pub log: PathBuf,
    pub opts: Options,
    /// The policy's `worker_uids` (first, last).
    pub worker_uids: (u32, u32),
    broker: Option<Child>,
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A worker uid range per broker (per test process and per harness in
/// it), so concurrent tests never offer their brokers the same uids. Taken
/// from just above the default range (2000000000..), like it outside what
/// useradd and systemd hand out: the broker refuses worker uids that meet
/// the host's /etc/subuid, /etc/subgid, passwd or group entries.
fn worker_uid_range() -> (u32, u32) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let slot = (std::process::id().wrapping_mul(64).wrapping_add(n)) % 20_000;
    let lo = 2_000_100_000 + slot * 50;
    (lo, lo + 49)
}

/// A broker's log as events: it writes one JSON object per line (its
/// stderr is a file). A line that is not JSON (a panic's message) is
/// skipped; a test of the format itself checks every line.
pub fn log_events(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The lines of worker `pid` the broker relayed (target `tapdisk`, the
/// broker's own `pid` field), in order.
pub fn worker_events(log: &str, pid: u64) -> Vec<serde_json::Value> {
    log_events(log)
        .into_iter()
        .filter(|e| e["target"] == "tapdisk" && e["pid"].as_u64() == Some(pid))
        .collect()
}

/// Whether the broker logged a warning whose message contains `text`.
pub fn warned(log: &str, text: &str) -> bool {
    log_events(log)
        .iter()
        .any(|e| e["level"] == "WARN" && e["message"].as_str().is_some_and(|m| m.contains(text)))
}

/// The text of a relayed worker line (its `line` field), or "".
pub fn line_of(e: &serde_json::Value) -> &str {
    e["line"].as_str().unwrap_or("")
}

impl Harness {
    pub fn start(opts: Options) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("tapjail-e2e-")
            .tempdir()
            .expect("tempdir");
        // Tenants must be able to reach the socket and nothing else here.
        chmod(dir.path(), 0o755);
        let socket = dir.path().join("run/broker.sock");
        let audit = dir.path().join("log/audit.jsonl");
        let state = dir.path().join("state");
        let devices = dir.path().join("dev");
        let policy = dir.path().join("policy.toml");
        let log = dir.path().join("broker.log");
        let uids = worker_uid_range();
        let worker = match opts.worker {
            WorkerBin::FakeSkipping(step) => {
                let link = dir.path().join(format!("fake-tapdisk-skip-{step}"));
                std::os::unix::fs::symlink(opts.worker.path(), &link).expect("symlink");
                link
            }
            w => w.path(),
        };
        let mut text = format!(
            "socket = {socket:?}\naudit_log = {audit:?}\nstate_dir = {state:?}\ndevice_dir = {devices:?}\n\
             worker_uids = [{}, {}]\ntapdisk = {:?}\nfrontend = {:?}\nrespawn = {}\n\
             worker_timeout_secs = {}\n{}\n",
            uids.0,
            uids.1,
            worker,
            opts.frontend,
            opts.respawn,
            opts.worker_timeout_secs,
            opts.extra,
        );
        for t in &opts.tenants {
            let root = dir.path().join("images").join(t.name);
            std::fs::create_dir_all(&root).expect("root");
            text.push_str(&format!(
                "\n[[tenant]]\nname = {:?}\nuids = [{}]\nimage_roots = [{:?}]\nwritable = {}\nmax_disks = {}\nadmin = {}\n",
                t.name, t.uid, root, t.writable, t.max_disks, t.admin
            ));
            for (_, line) in opts.tenant_lines.iter().filter(|(n, _)| *n == t.name) {
                // `{root}` stands for the tenant's image root.
                text.push_str(&line.replace("{root}", &root.display().to_string()));
                text.push('\n');
            }
        }
        std::fs::write(&policy, text).expect("policy");
        let mut h = Harness {
            dir,
            socket,
            audit,
            state,
            devices,
            policy,
            log,
            opts,
            worker_uids: uids,
            broker: None,
        };
        h.launch();
        h
    }

    /// Start tap-broker and wait until it accepts connections.
    pub fn launch(&mut self) {
        self.launch_bin(&bin("tap-broker"));
    }

    /// Start the tap-broker binary at `exe` (a copy elsewhere stands for
    /// an upgrade) and wait until it accepts connections.
    pub fn launch_bin(&mut self, exe: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(exe)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("TAPJAIL_LOG")
            .env_remove("RUST_LOG")
            .env_remove("TAPJAIL_LOG_FORMAT")
            .env_remove("JOURNAL_STREAM")
            .envs(self.opts.env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("--config")
            .arg(&self.policy)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn tap-broker");
        self.broker = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self
                .broker
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tap-broker exited ({st}):\n{}", self.broker_log());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tap-broker did not start:\n{}", self.broker_log());
    }

    pub fn broker_pid(&self) -> u32 {
        self.broker.as_ref().expect("broker running").id()
    }

    /// Wait for a fio started on one of this broker's devices to end (at
    /// most 300 s: the broker respawns or adopts what it must, so fio
    /// finishes or the test fails with a message, never hangs) and require
    /// that it succeeded `across` what the test did. Returns its stdout.
    pub fn fio_finished_ok(&self, mut fio: Child, across: &str) -> String {
        assert!(
            eventually(Duration::from_secs(300), || fio
                .try_wait()
                .ok()
                .flatten()
                .is_some()),
            "fio still running after 300 s ({across})\n{}",
            self.broker_log()
        );
        let out = fio.wait_with_output().expect("fio's output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "fio failed across {across}: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.broker_log()
        );
        stdout
    }

    /// The tapdisk pid `list -m MINOR` shows (as root), if a worker serves
    /// that minor.
    pub fn worker_pid_of(&self, minor: &str) -> Option<u32> {
        pid_field(&self.ok(&ROOT, &["list", "-m", minor]))
    }

    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's log as events (see [`log_events`]).
    pub fn broker_events(&self) -> Vec<serde_json::Value> {
        log_events(&self.broker_log())
    }

    /// The image root of tenant `name`.
    pub fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join("images").join(name)
    }

    /// Give `path` to the tenant whose image root holds it (the broker
    /// opens only a tenant's own files, with her credentials); a path in
    /// no root is left as it is.
    pub fn own(&self, path: &Path) {
        let Some(t) = self
            .opts
            .tenants
            .iter()
            .find(|t| path.starts_with(self.root(t.name)))
        else {
            return;
        };
        std::os::unix::fs::chown(path, Some(t.uid), Some(t.gid)).expect("chown image");
    }

    /// Create a raw image of `size` bytes in tenant `name`'s root, owned
    /// by that tenant.
    pub fn raw_image(&self, tenant: &str, file: &str, size: u64) -> PathBuf {
        let p = self.root(tenant).join(file);
        let f = std::fs::File::create(&p).expect("image");
        f.set_len(size).expect("size");
        self.own(&p);
        p
    }

    /// Create a dynamic VHD of `mib` MiB in tenant `name`'s root with
    /// `tap-ctl vhd create` (the offline tool, as root), owned by the
    /// tenant.
    pub fn vhd_image(&self, tenant: &str, file: &str, mib: u64) -> PathBuf {
        let p = self.root(tenant).join(file);
        let out = Command::new(bin("tap-ctl"))
            .args(["vhd", "create", "-n"])
            .arg(&p)
            .args(["-s", &mib.to_string()])
            .output()
            .expect("tap-ctl vhd create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.own(&p);
        p
    }

    /// A differencing child of `parent` (any path) at `child`.
    pub fn vhd_snapshot(&self, child: &Path, parent: &Path) {
        let out = Command::new(bin("tap-ctl"))
            .args(["vhd", "snapshot", "-n"])
            .arg(child)
            .arg("-p")
            .arg(parent)
            .output()
            .expect("tap-ctl vhd snapshot");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.own(child);
    }

    fn ctl_cmd(&self, uid: u32, gid: u32, args: &[&str]) -> Command {
        let mut c = Command::new(bin("tap-ctl"));
        c.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("TAPJAIL_SOCKET");
        if uid != 0 || gid != 0 {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Run tap-ctl as `uid`/`gid` with stdout not a terminal.
    pub fn ctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        self.ctl_cmd(uid, gid, args)
            .stdin(Stdio::null())
            .output()
            .expect("run tap-ctl")
    }

    /// Run tap-ctl as `t` with `input` on its stdin (e.g. `open -E`'s key).
    pub fn ctl_input(&self, t: &TenantSpec, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .ctl_cmd(t.uid, t.gid, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tap-ctl");
        let mut stdin = child.stdin.take().expect("stdin");
        // tap-ctl may refuse before reading: a broken pipe is its answer.
        let _ = stdin.write_all(input);
        drop(stdin);
        child.wait_with_output().expect("tap-ctl output")
    }

    /// The tap-ctl command for `t` with `args`, to spawn and outlive the
    /// borrow (a request left running across a broker crash).
    pub fn ctl_command(&self, t: &TenantSpec, args: &[&str]) -> Command {
        self.ctl_cmd(t.uid, t.gid, args)
    }

    pub fn ctl(&self, t: &TenantSpec, args: &[&str]) -> Output {
        self.ctl_as(t.uid, t.gid, args)
    }

    /// Run tap-ctl and require success; returns stdout.
    pub fn ok(&self, t: &TenantSpec, args: &[&str]) -> String {
        let out = self.ctl(t, args);
        assert!(
            out.status.success(),
            "tap-ctl {args:?} as {} failed: {}\n--- broker log ---\n{}",
            t.name,
            String::from_utf8_lossy(&out.stderr),
            self.broker_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run tap-ctl and require failure; returns stderr.
    pub fn fails(&self, t: &TenantSpec, args: &[&str]) -> String {
        let out = self.ctl(t, args);
        assert!(
            !out.status.success(),
            "tap-ctl {args:?} as {} should fail but printed {:?}",
            t.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Run tap-ctl with stdout on a pseudo-terminal (blktap prints
    /// differently there); returns what it printed, `\r\n` → `\n`.
    pub fn ctl_tty(&self, t: &TenantSpec, args: &[&str]) -> (bool, String) {
        let (master, slave) = openpty();
        let mut child = self
            .ctl_cmd(t.uid, t.gid, args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(slave))
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tap-ctl on a pty");
        let status = child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let mut out = Vec::new();
        let mut m = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        // Reading the master after the slave closed ends with EIO.
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
        (status.success(), if status.success() { text } else { err })
    }

    /// Every audit line, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// SIGINT the broker and wait for it (it destroys every disk first).
    pub fn stop(&mut self) {
        self.signal_and_wait(libc::SIGINT);
    }

    /// SIGTERM the broker and wait for it: a planned restart, which leaves
    /// every disk served for the next broker.
    pub fn stop_for_restart(&mut self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    fn signal_and_wait(&mut self, sig: i32) {
        if let Some(mut c) = self.broker.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("tap-broker ignored signal {sig} for 60 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL the broker (a crash), leaving its state behind.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.broker.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

fn openpty() -> (OwnedFd, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two fds into our locals; the other pointer
    // arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

/// Whether process `pid` is an fd holder (`tap-broker --fd-holder`).
pub fn is_fd_holder(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--fd-holder"))
}

/// Whether process `pid` is the broker's image opener
/// (`tap-broker --open-helper`).
pub fn is_opener(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--open-helper"))
}

/// Whether process `pid` is one of the helpers tap-broker starts for
/// itself (fd holder, image opener) rather than a worker.
pub fn is_broker_helper(pid: u32) -> bool {
    is_fd_holder(pid) || is_opener(pid)
}

/// The tapdisk workers among `broker`'s children (not its fd holder or
/// image opener).
pub fn workers_of(broker: u32) -> Vec<u32> {
    children_of(broker)
        .into_iter()
        .filter(|p| !is_broker_helper(*p))
        .collect()
}

/// Client connections the broker has open on its control socket: accepted
/// sockets show the listener's path in /proc/net/unix, so every line with
/// that path but the listener's own.
pub fn control_connections(h: &Harness) -> usize {
    let path = h.socket.to_string_lossy().to_string();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let n = table
        .lines()
        .filter(|l| l.split_whitespace().nth(7) == Some(path.as_str()))
        .count();
    n.saturating_sub(1)
}

/// Number of fds open in process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Number of pipe fds open in process `pid`.
pub fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|state| state != 'Z')
}

/// The state letter of process `pid` (`R`, `S`, `Z`, `T` stopped, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Wait up to `limit` for `cond`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Read one 4 KiB block of `dev` with O_DIRECT (no page cache to answer
/// for the device) and wait up to `limit`: `Some(succeeded)`, or `None`
/// when the read still hangs then (the reader is killed, which a task in
/// D state ignores, so the caller should fail at once).
pub fn direct_read_outcome(dev: &std::path::Path, limit: Duration) -> Option<bool> {
    let mut dd = std::process::Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dd");
    if !eventually(limit, || dd.try_wait().ok().flatten().is_some()) {
        let _ = dd.kill();
        return None;
    }
    Some(dd.wait().expect("dd").success())
}

/// The `pid=` field of one of `list`'s `key=value` rows.
pub fn pid_field(row: &str) -> Option<u32> {
    row.split_whitespace()
        .find_map(|f| f.strip_prefix("pid=")?.parse().ok())
}
