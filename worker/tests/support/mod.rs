//! Helpers shared by the tapdisk process tests (confinement, NBD, broker
//! mode): start a standalone `tapdisk --nbd`, drive a broker-mode worker
//! over its control socket, and a minimal NBD client for what qemu cannot
//! show (exact error codes, hostile input).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const TAPDISK: &str = env!("CARGO_BIN_EXE_tapdisk");

#[allow(unused_imports)] // each test file uses its own subset
pub use tapjail_testsupport::{have, is_root, require};

/// A raw image of `size` bytes filled with `fill`, in `dir`.
pub fn raw_image(dir: &Path, name: &str, size: usize, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size]).unwrap();
    p
}

/// A standalone `tapdisk --nbd` serving one image; killed (SIGTERM) on drop.
pub struct Standalone {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
}

impl Standalone {
    pub fn start(dir: &Path, spec: &str, extra: &[&str]) -> Standalone {
        let socket = dir.join("nbd.sock");
        let stderr_path = dir.join("tapdisk.log");
        let log = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(TAPDISK)
            .arg("--nbd")
            .arg(&socket)
            .arg("-a")
            .arg(spec)
            .args(extra)
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Standalone {
            child,
            socket,
            stderr_path,
        };
        s.wait_serving();
        s
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // The whole "serving ... (worker pid N)" line, not a prefix.
            let serving = serving_line(&self.log()).is_some();
            if serving && UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tapdisk did not start serving:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// How many clients the server takes at once, from its "serving"
    /// event (sized from the RLIMIT_MEMLOCK headroom, see `nbd::sizing`).
    pub fn max_clients(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|e| e["max_clients"].as_u64());
            if let Some(n) = found {
                return n.try_into().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no max_clients in:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The confined worker's pid, from the monitor's "serving" line.
    pub fn worker_pid(&self) -> u32 {
        let log = self.log();
        let e =
            serving_line(&log).unwrap_or_else(|| panic!("no complete \"serving\" line in:\n{log}"));
        e["worker_pid"].as_u64().unwrap().try_into().unwrap()
    }

    /// Ask the monitor to stop (SIGTERM) and return its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Run qemu-io on `url` with `cmds`; returns (success, stdout+stderr).
pub fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(url).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // qemu-io reports failed commands on stdout but still exits 0 for some.
    let failed = text.contains("failed") || text.contains("Pattern verification failed");
    (out.status.success() && !failed, text)
}

/// Spawn `tapdisk --broker --frontend F` with a socketpair as fd 3; returns
/// the child and our end of the control socket.
pub fn spawn_broker_mode(frontend: &str, extra_fd: Option<&OwnedFd>) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let raw = theirs.as_raw_fd();
    let extra = extra_fd.map(|f| f.as_raw_fd());
    let mut cmd = Command::new(TAPDISK);
    cmd.args(["--broker", "--frontend", frontend]);
    // SAFETY: only async-signal-safe dup2/fcntl in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = extra {
                // A stray fd the worker must close (fd 5, not close-on-exec).
                if libc::dup2(fd, 5) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    (child, ours)
}

/// Fields of /proc/PID/status.
pub fn proc_status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

// ------------------------------------------------------------- NBD client

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// A minimal fixed-newstyle client.
pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
}

/// One reply: error and data (for reads) or raw chunk payloads.
#[derive(Debug)]
pub struct ReplyMsg {
    pub handle: u64,
    pub error: u32,
    pub data: Vec<u8>,
    /// (type, payload) of each structured chunk.
    pub chunks: Vec<(u16, Vec<u8>)>,
}

impl Client {
    pub fn connect(sock: &Path, structured: bool, meta: bool) -> Client {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle + no zeroes
        let mut c = Client {
            s,
            size: 0,
            flags: 0,
            structured: false,
        };
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.reply_type(), 1);
            c.structured = true;
        }
        if meta {
            let mut d = Vec::new();
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            c.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(c.reply_type(), 4);
            assert_eq!(c.reply_type(), 1);
        }
        let mut go = Vec::new();
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &go);
        loop {
            let (rep, data) = c.reply();
            match rep {
                3 if data[..2] == [0, 0] => {
                    c.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    c.flags = u16::from_be_bytes([data[10], data[11]]);
                }
                3 => {}
                1 => break,
                other => panic!("GO failed: {other:#x}"),
            }
        }
        c
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
    }

    fn reply_type(&mut self) -> u32 {
        self.reply().0
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Read one reply; `read_len` is the data length of a simple READ reply.
    pub fn read_reply(&mut self, read_len: usize) -> std::io::Result<ReplyMsg> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let magic = u32::from_be_bytes(m);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut r = [0u8; 12];
            self.s.read_exact(&mut r)?;
            let error = u32::from_be_bytes(r[..4].try_into().unwrap());
            let handle = u64::from_be_bytes(r[4..12].try_into().unwrap());
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            self.s.read_exact(&mut data)?;
            return Ok(ReplyMsg {
                handle,
                error,
                data,
                chunks: vec![],
            });
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut msg = ReplyMsg {
            handle: 0,
            error: 0,
            data: vec![],
            chunks: vec![],
        };
        loop {
            let mut r = [0u8; 16];
            self.s.read_exact(&mut r)?;
            let flags = u16::from_be_bytes([r[0], r[1]]);
            let kind = u16::from_be_bytes([r[2], r[3]]);
            msg.handle = u64::from_be_bytes(r[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(r[12..16].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p)?;
            match kind {
                1 => msg.data.extend_from_slice(&p[8..]),
                k if k & 0x8000 != 0 => msg.error = u32::from_be_bytes(p[..4].try_into().unwrap()),
                _ => {}
            }
            msg.chunks.push((kind, p));
            if flags & 1 != 0 {
                return Ok(msg);
            }
            self.s.read_exact(&mut m)?;
            assert_eq!(u32::from_be_bytes(m), STRUCTURED_REPLY_MAGIC);
        }
    }
}

/// True if the server closed `s` (EOF or reset) within a few seconds.
pub fn closed_by_server(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. the greeting or an error reply first
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            }
        }
    }
}

/// The monitor's "serving ... (worker pid N)" event: a whole JSON line (its
/// stderr is a file, so it logs JSON lines) with the `worker_pid` field.
fn serving_line(log: &str) -> Option<serde_json::Value> {
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving "))
                && e["worker_pid"].is_u64()
        })
}
