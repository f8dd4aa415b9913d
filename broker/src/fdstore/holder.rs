//! `tap-broker --fd-holder`: keeps fds by name for the broker while no
//! broker runs, where systemd does not.
//!
//! It does one thing: on a listening socket in `state_dir` (inherited as
//! fd 3, made by the broker so there is no startup race), it serves one
//! connection at a time from a peer of its own uid (root), answering
//! [`ToHolder`] frames: `Put` (keep the one attached fd under a name),
//! `Remove`, `Take` (send dups of everything, at most
//! [`frame::MAX_FDS`] per frame). It never reads, writes or polls the fds
//! it keeps. When a connection ends and it holds nothing, it removes its
//! socket and exits. The broker keeps one connection open for its whole
//! life, so the holder only ever decides to exit after the broker is gone.

use super::{valid_name, FdStoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tapjail_common::frame::{self, Deadline, MAX_FDS};

/// The holder's socket in `state_dir`.
pub const SOCKET: &str = "fdholder.sock";
/// Most fds held at once (a disk needs about six).
pub const MAX_HELD: usize = 60_000;
/// Largest frame either side sends (a `Batch` of eight names).
const MAX_FRAME: usize = 8 * 1024;
/// How long the broker waits for one answer of a live holder.
const ANSWER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHolder {
    /// fds: \[the one to keep\].
    Put {
        name: String,
    },
    Remove {
        name: String,
    },
    /// Answered by `Batch`es, then `Done`.
    Take,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromHolder {
    Ok,
    /// fds: one per name, in order.
    Batch {
        names: Vec<String>,
    },
    Done,
    Error(String),
}

/// Run the holder on `listener` until it holds nothing after a connection.
pub fn serve(listener: UnixListener) -> io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if rustix::net::sockopt::socket_peercred(&conn).is_ok_and(|c| c.uid.as_raw() == me) {
            serve_conn(&conn, &mut held);
        }
        drop(conn);
        if held.is_empty() {
            if let Ok(addr) = listener.local_addr() {
                if let Some(p) = addr.as_pathname() {
                    let _ = std::fs::remove_file(p);
                }
            }
            return Ok(());
        }
    }
}

fn serve_conn(conn: &UnixStream, held: &mut BTreeMap<String, OwnedFd>) {
    loop {
        let Ok((req, mut fds)) = frame::recv_on::<_, ToHolder>(conn, MAX_FRAME) else {
            return;
        };
        let reply = match (req, fds.len()) {
            (ToHolder::Put { name }, 1) if !valid_name(&name) => {
                FromHolder::Error(format!("invalid name {name:?}"))
            }
            (ToHolder::Put { name }, 1) if held.len() >= MAX_HELD && !held.contains_key(&name) => {
                FromHolder::Error(format!("holding {MAX_HELD} fds already"))
            }
            (ToHolder::Put { name }, 1) => {
                if let Some(fd) = fds.pop() {
                    held.insert(name, fd);
                }
                FromHolder::Ok
            }
            (ToHolder::Remove { name }, 0) => {
                held.remove(&name);
                FromHolder::Ok
            }
            (ToHolder::Take, 0) => {
                let all: Vec<(&String, &OwnedFd)> = held.iter().collect();
                for chunk in all.chunks(MAX_FDS) {
                    let names = chunk.iter().map(|(n, _)| (*n).clone()).collect();
                    let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, f)| f.as_fd()).collect();
                    if frame::send_on(conn, &FromHolder::Batch { names }, &fds).is_err() {
                        return;
                    }
                }
                FromHolder::Done
            }
            (req, n) => FromHolder::Error(format!("{req:?} with {n} fd(s) is not a request")),
        };
        if frame::send_on(conn, &reply, &[]).is_err() {
            return;
        }
    }
}

/// The broker's connection to the holder.
#[derive(Debug)]
pub struct HolderClient {
    sock: Mutex<UnixStream>,
    path: PathBuf,
}

impl HolderClient {
    /// Connect to the holder in `state_dir`, starting one (`exe
    /// --fd-holder`) if none runs.
    pub fn connect_or_spawn(state_dir: &Path, exe: &Path) -> Result<HolderClient, FdStoreError> {
        let path = state_dir.join(SOCKET);
        let err = |source: io::Error| FdStoreError::Holder {
            path: path.display().to_string(),
            source,
        };
        // A holder that is exiting (it held nothing) may take our
        // connection down with it: then start a fresh one.
        let mut last = None;
        for _ in 0..3 {
            let sock = match UnixStream::connect(&path) {
                Ok(s) => s,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
                    ) =>
                {
                    spawn(&path, exe).map_err(err)?;
                    UnixStream::connect(&path).map_err(err)?
                }
                Err(e) => return Err(err(e)),
            };
            let client = HolderClient {
                sock: Mutex::new(sock),
                path: path.clone(),
            };
            match client.call(&ToHolder::Remove { name: "-".into() }, &[]) {
                Ok(()) => return Ok(client),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err(io::Error::other("cannot reach the fd holder"))))
    }

    fn lost(&self, e: impl std::fmt::Display) -> FdStoreError {
        FdStoreError::Holder {
            path: self.path.display().to_string(),
            source: io::Error::other(e.to_string()),
        }
    }

    fn call(&self, req: &ToHolder, fds: &[BorrowedFd<'_>]) -> Result<(), FdStoreError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        frame::send_on(&*sock, req, fds).map_err(|e| self.lost(e))?;
        let (reply, _): (FromHolder, _) = frame::recv_on_by(
            &*sock,
            MAX_FRAME,
            Deadline::at(std::time::Instant::now() + ANSWER),
        )
        .map_err(|e| self.lost(e))?;
        match reply {
            FromHolder::Ok => Ok(()),
            FromHolder::Error(m) => Err(FdStoreError::HolderSaid(m)),
            other => Err(self.lost(format!("answered {other:?}"))),
        }
    }

    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        self.call(
            &ToHolder::Put {
                name: name.to_string(),
            },
            &[fd],
        )
    }

    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        self.call(
            &ToHolder::Remove {
                name: name.to_string(),
            },
            &[],
        )
    }

    /// Dups of everything held (the holder keeps its own until `remove`).
    pub fn take(&self) -> Result<Vec<(String, OwnedFd)>, FdStoreError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        frame::send_on(&*sock, &ToHolder::Take, &[]).map_err(|e| self.lost(e))?;
        let mut out = Vec::new();
        loop {
            let (reply, fds): (FromHolder, _) = frame::recv_on_by(
                &*sock,
                MAX_FRAME,
                Deadline::at(std::time::Instant::now() + ANSWER),
            )
            .map_err(|e| self.lost(e))?;
            match reply {
                FromHolder::Batch { names } if names.len() == fds.len() => {
                    out.extend(names.into_iter().zip(fds));
                }
                FromHolder::Done => return Ok(out),
                FromHolder::Error(m) => return Err(FdStoreError::HolderSaid(m)),
                other => return Err(self.lost(format!("answered {other:?} to Take"))),
            }
        }
    }
}

/// Bind the holder's socket and start `exe --fd-holder` on it, in its own
/// session (no terminal's Ctrl-C, no broker's process group reaches it).
fn spawn(path: &Path, exe: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("--fd-holder")
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec; only async-signal-safe
    // calls (setsid, dup2, sigprocmask, close_range) on plain integers.
    unsafe {
        cmd.pre_exec(move || holder_child_setup(fd));
    }
    let mut child = cmd.spawn()?;
    // Reap it if it ever exits while this broker runs.
    let _ = std::thread::Builder::new()
        .name("fd-holder-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    Ok(())
}

fn holder_child_setup(listener: i32) -> io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain syscalls on integers and a local sigset_t.
    unsafe {
        check(libc::setsid().into())?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()).into())?;
        check(libc::dup2(listener, 3).into())?;
        check(libc::syscall(
            libc::SYS_close_range,
            4,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ))?;
    }
    Ok(())
}

/// Give up everything the holder does not need: it only accepts on a
/// socket it was handed and passes fds around, so no capability, no new
/// privileges, not dumpable (its fds are disks' lifelines).
fn drop_privileges() -> io::Result<()> {
    crate::self_confine::keep_only_capabilities(0)
}

/// `tap-broker --fd-holder`: fd 3 is the listening socket.
pub fn main() -> std::process::ExitCode {
    if let Err(e) = drop_privileges() {
        tracing::error!("--fd-holder: dropping privileges: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // SAFETY: the broker started us with its listening socket on fd 3 and
    // nothing else owns it; fstat checks it is a socket first.
    let listener = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(3, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            tracing::error!("--fd-holder: fd 3 is not the holder's listening socket (tap-broker starts the holder itself)");
            return std::process::ExitCode::from(2);
        }
        UnixListener::from(OwnedFd::from_raw_fd(3))
    };
    match serve(listener) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn holder_on(dir: &Path) -> std::thread::JoinHandle<io::Result<()>> {
        let listener = UnixListener::bind(dir.join(SOCKET)).unwrap();
        std::thread::spawn(move || serve(listener))
    }

    fn connect(dir: &Path) -> HolderClient {
        HolderClient {
            sock: Mutex::new(UnixStream::connect(dir.join(SOCKET)).unwrap()),
            path: dir.join(SOCKET),
        }
    }

    #[test]
    fn holder_keeps_fds_across_connections_and_exits_once_empty() {
        let dir = tempfile::tempdir().unwrap();
        let h = holder_on(dir.path());
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        {
            let c = connect(dir.path());
            c.put("w1.ctl", w.as_fd()).unwrap();
            c.put("m0.loop", w.as_fd()).unwrap();
            // A bad name and a Put without its fd are refused, nothing kept.
            assert!(matches!(
                c.put("a:b", w.as_fd()),
                Err(FdStoreError::HolderSaid(_))
            ));
            assert!(matches!(
                c.call(&ToHolder::Put { name: "x".into() }, &[]),
                Err(FdStoreError::HolderSaid(_))
            ));
            c.remove("m0.loop").unwrap();
            // The client (a "broker") goes away.
        }
        drop(w);
        // The holder still holds the write end: no EOF for the reader.
        r.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            r.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!h.is_finished());
        // A second "broker" gets it back, and it is the same socket.
        let c = connect(dir.path());
        let got = c.take().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "w1.ctl");
        let mut back = UnixStream::from(got.into_iter().next().unwrap().1);
        back.write_all(b"x").unwrap();
        r.set_nonblocking(false).unwrap();
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        c.remove("w1.ctl").unwrap();
        drop(back);
        drop(c);
        // Empty after that connection: it exits and removes its socket.
        h.join().unwrap().unwrap();
        assert!(!dir.path().join(SOCKET).exists());
        assert_eq!(r.read(&mut b).unwrap(), 0, "EOF once nobody holds it");
    }

    #[test]
    fn take_returns_more_fds_than_one_frame_carries() {
        let dir = tempfile::tempdir().unwrap();
        let h = holder_on(dir.path());
        let c = connect(dir.path());
        let f = std::fs::File::open("/dev/null").unwrap();
        for i in 0..(MAX_FDS * 2 + 3) {
            c.put(&format!("f{i}"), f.as_fd()).unwrap();
        }
        let got = c.take().unwrap();
        assert_eq!(got.len(), MAX_FDS * 2 + 3);
        for (n, _) in &got {
            c.remove(n).unwrap();
        }
        drop(c);
        h.join().unwrap().unwrap();
    }
}
