//! Spawning tapdisk workers and talking to them.
//!
//! A worker is `fork`+`exec` of the tapdisk binary with an empty
//! environment, `/` as its directory, `/dev/null` on stdin/stdout, a pipe
//! the broker reads on stderr (`worker_log`: tagged, escaped, bounded
//! lines, never raw bytes in the journal), the control socket as fd 3 and
//! nothing else, RLIMIT_MEMLOCK set, in its own process group (so a Ctrl-C
//! aimed at a foreground broker reaches only the broker, which then shuts
//! workers down in order). It confines itself, drops to the uid/gid given on
//! its command line and says `Ready`; the broker then checks from outside,
//! in `/proc`, that it really is confined before using it.
//!
//! Everything a worker sends is untrusted (it parsed a hostile image):
//! frames are size-limited, fds from it are refused, strings are cleaned
//! before they reach a client's terminal or the audit log, every reply
//! has a deadline after which the worker is killed, and an answer that does
//! not fit the request, or a message nobody asked for, gets it killed too
//! (rather than shifting every later answer by one). Why the broker killed a
//! worker is kept for the audit line of its exit.

use crate::sys;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tapjail_common::frame::{self, Deadline, FrameError, MAX_REQUEST_FRAME};
use tapjail_common::proto::FrontendKind;
use tapjail_common::worker_proto::{FromWorker, ParentLocator, ToWorker, CONTROL_FD};

/// Most parent requests one open may make (a chain deeper than this is
/// refused: blktap's own limit is far lower in practice).
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Most locators the broker will try per parent request.
pub const MAX_LOCATORS: usize = 16;
/// Operation deadline of a connection nobody configured (the policy's
/// default `operation_timeout_secs`).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest worker-supplied string passed on to clients and the audit log.
pub const MAX_WORKER_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("tapdisk {pid}: {source}")]
    Frame {
        pid: u32,
        #[source]
        source: FrameError,
    },
    #[error("tapdisk {pid} did not answer within {secs} s and was killed")]
    Timeout { pid: u32, secs: u64 },
    #[error(
        "tapdisk {pid} did not finish {what} within the {secs} s operation deadline \
         (operation_timeout_secs) and was killed"
    )]
    OperationTimeout {
        pid: u32,
        what: &'static str,
        secs: u64,
    },
    #[error("tapdisk {pid} broke the protocol: {what}")]
    Protocol { pid: u32, what: String },
    #[error("tapdisk {pid}: {message}")]
    Worker { pid: u32, message: String },
    #[error("tapdisk {pid} is not confined ({what}); it was killed")]
    NotConfined { pid: u32, what: String },
}

/// How to start workers.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    pub tapdisk: PathBuf,
    /// Where each worker's control socket and stderr pipe are kept, so
    /// that it outlives this broker (see `crate::fdstore`).
    pub store: Option<Arc<tapjail_broker::fdstore::FdStore>>,
    /// RLIMIT_MEMLOCK (soft and hard), bytes.
    pub memlock: u64,
    /// For each message a worker sends, the whole of it.
    pub timeout: Duration,
    /// For a whole exchange of several messages (an open and every parent
    /// request it makes), so that a worker answering each message just in
    /// time cannot make it last for ever.
    pub op_timeout: Duration,
}

/// A freshly started, verified worker.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub pidfd: Arc<OwnedFd>,
    pub conn: WorkerConn,
    pub start_time: u64,
    /// Its control socket and stderr pipe in the fd store (`wPID.ctl`,
    /// `wPID.log`), removed when this is dropped.
    pub kept: Option<tapjail_broker::fdstore::Kept>,
}

/// The store names of worker `pid`'s control socket and stderr pipe.
pub fn kept_names(pid: u32) -> [String; 2] {
    [format!("w{pid}.ctl"), format!("w{pid}.log")]
}

/// Replace control characters and cap the length of text that came from a
/// worker, so it cannot forge lines or drive a terminal.
pub fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_WORKER_TEXT)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_WORKER_TEXT {
        out.push('…');
    }
    out
}

/// Start a worker running as `uid`/`uid` for `frontend` and wait for it to
/// be confined.
pub fn spawn(cfg: &SpawnConfig, frontend: FrontendKind, uid: u32) -> Result<Spawned, WorkerError> {
    let (ours, theirs) = UnixStream::pair()?; // both CLOEXEC
    let (log_r, log_w) = crate::worker_log::pipe()?;
    let memlock = cfg.memlock;
    let child_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&cfg.tapdisk);
    cmd.arg("--broker")
        .arg("--frontend")
        .arg(frontend.as_str())
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--gid")
        .arg(uid.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_w))
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (dup2, fcntl, setrlimit,
    // close_range) on plain integers; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || child_setup(child_fd, memlock));
    }
    let child = cmd.spawn().map_err(|source| WorkerError::Spawn {
        path: cfg.tapdisk.display().to_string(),
        source,
    })?;
    drop(theirs);
    // The child holds the only write end now (the Command's copy goes with it).
    drop(cmd);
    let pid = child.id();
    let keep = match &cfg.store {
        Some(_) => Some((ours.try_clone()?, OwnedFd::from(log_r.try_clone()?))),
        None => None,
    };
    crate::worker_log::forward(log_r, pid);
    // The child is ours and not yet reaped, so its pid cannot have been
    // reused: this pidfd names exactly it. The supervisor reaps through it.
    let pidfd = Arc::new(sys::pidfd_open(pid)?);
    drop(child);
    let mut conn = WorkerConn::new(ours, pid, cfg.timeout)?.with_op_timeout(cfg.op_timeout);
    conn.pidfd = Some(pidfd.clone());
    let fail = |e: WorkerError| {
        sys::kill_and_reap(pidfd.as_fd());
        e
    };
    let ready = conn.recv().map_err(fail)?;
    match ready {
        FromWorker::Ready { pid: said } if said == pid => {}
        FromWorker::Ready { pid: said } => {
            return Err(fail(WorkerError::Protocol {
                pid,
                what: format!("Ready names pid {said}"),
            }))
        }
        FromWorker::Error(m) => {
            return Err(fail(WorkerError::Worker {
                pid,
                message: clean(&m),
            }))
        }
        other => {
            return Err(fail(WorkerError::Protocol {
                pid,
                what: format!("expected Ready, got {}", variant(&other)),
            }))
        }
    }
    let info = sys::proc_info(pid).map_err(|e| fail(e.into()))?;
    if let Some(what) = confinement_problem(&info, uid) {
        return Err(fail(WorkerError::NotConfined { pid, what }));
    }
    let kept = match (&cfg.store, &keep) {
        (Some(store), Some((ctl, log))) => {
            let [c, l] = kept_names(pid);
            match tapjail_broker::fdstore::Kept::put(store, &[(c, ctl.as_fd()), (l, log.as_fd())]) {
                Ok(k) => Some(k),
                Err(e) => {
                    eprintln!(
                        "tap-broker: tapdisk {pid}: cannot keep its control socket in the {}: {e}; \
                         it would not survive a broker restart",
                        store.kind()
                    );
                    None
                }
            }
        }
        _ => None,
    };
    Ok(Spawned {
        pid,
        pidfd,
        conn,
        start_time: info.start_time,
        kept,
    })
}

/// What is wrong with a worker's confinement as `/proc` shows it, if anything.
pub fn confinement_problem(info: &sys::ProcInfo, uid: u32) -> Option<String> {
    if info.uids != [uid; 4] {
        return Some(format!("uids {:?}, expected {uid}", info.uids));
    }
    if info.gids != [uid; 4] {
        return Some(format!("gids {:?}, expected {uid}", info.gids));
    }
    if info.cap_eff != 0 {
        return Some(format!("CapEff {:#x}", info.cap_eff));
    }
    if !info.no_new_privs {
        return Some("NoNewPrivs is 0".into());
    }
    if info.seccomp != 2 {
        return Some(format!("Seccomp is {}, not 2 (filter)", info.seccomp));
    }
    if info.proc_owner != 0 {
        return Some(format!(
            "dumpable (its /proc files belong to uid {}, not root)",
            info.proc_owner
        ));
    }
    // Its own network and mount namespaces (the latter with an empty root),
    // never the host's, which are ours.
    let me = std::process::id();
    for (name, theirs) in [("net", info.net_ns), ("mnt", info.mnt_ns)] {
        if theirs == 0 || theirs == sys::ns_inode(me, name) {
            return Some(format!("in the host's {name} namespace"));
        }
    }
    None
}

/// In the forked child: control socket to fd 3, memlock limit, and every
/// other fd above 3 marked close-on-exec (not closed, so std's exec-error
/// pipe still works).
fn child_setup(child_fd: i32, memlock: u64) -> io::Result<()> {
    let check = |rc: i32| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // The broker blocks its termination signals (a thread sigwaits for
    // them); the mask survives exec, so clear it for the worker.
    // SAFETY: sigemptyset/sigprocmask on a local sigset_t.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut(),
        ))?;
    }
    if child_fd == CONTROL_FD {
        // SAFETY: fcntl on an fd this process owns; integer arguments.
        check(unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) })?;
    } else {
        // SAFETY: dup2 onto fd 3; dup2 clears FD_CLOEXEC on the new fd.
        check(unsafe { libc::dup2(child_fd, CONTROL_FD) })?;
    }
    let lim = libc::rlimit {
        rlim_cur: memlock,
        rlim_max: memlock,
    };
    // SAFETY: setrlimit reads the struct we pass by reference.
    check(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) })?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            CONTROL_FD + 1,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check(i32::try_from(rc).unwrap_or(-1))
}

fn variant(m: &FromWorker) -> &'static str {
    match m {
        FromWorker::Ready { .. } => "Ready",
        FromWorker::NeedParent { .. } => "NeedParent",
        FromWorker::Opened { .. } => "Opened",
        FromWorker::Serving => "Serving",
        FromWorker::Ok => "Ok",
        FromWorker::Stats(_) => "Stats",
        FromWorker::Error(_) => "Error",
        FromWorker::Resynced { .. } => "Resynced",
    }
}

/// A parent request from the worker, already bounded.
#[derive(Debug, Clone)]
pub struct ParentRequest {
    pub child: String,
    pub locators: Vec<ParentLocator>,
}

/// What the worker reported once a chain is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub virtual_size: u64,
    pub chain: Vec<String>,
}

/// The broker's end of one worker's control socket.
#[derive(Debug)]
pub struct WorkerConn {
    sock: UnixStream,
    pid: u32,
    timeout: Duration,
    op_timeout: Duration,
    /// Killed through this when it breaks the protocol or misses a
    /// deadline: its state is then unknown and it may be hostile.
    pidfd: Option<Arc<OwnedFd>>,
    /// Why the broker killed it, for the audit line of its exit.
    killed: Arc<OnceLock<String>>,
}

impl WorkerConn {
    pub fn new(sock: UnixStream, pid: u32, timeout: Duration) -> io::Result<Self> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(WorkerConn {
            sock,
            pid,
            timeout,
            op_timeout: DEFAULT_OP_TIMEOUT,
            pidfd: None,
            killed: Arc::default(),
        })
    }

    /// Kill through this pidfd when the worker breaks the protocol.
    pub fn set_pidfd(&mut self, pidfd: Arc<OwnedFd>) {
        self.pidfd = Some(pidfd);
    }

    /// Bound every multi-message exchange (see [`SpawnConfig::op_timeout`]).
    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    /// Set (once) to why the broker killed this worker; the supervisor
    /// puts it in the audit line of the worker's exit.
    pub fn kill_note(&self) -> Arc<OnceLock<String>> {
        self.killed.clone()
    }

    /// Kill the worker for `err`, noting why first.
    fn kill(&self, err: WorkerError) -> WorkerError {
        let _ = self.killed.set(err.to_string());
        if let Some(fd) = &self.pidfd {
            let _ = sys::pidfd_kill(fd.as_fd());
        }
        err
    }

    fn frame_err(&self, e: FrameError) -> WorkerError {
        self.frame_err_within(e, None)
    }

    /// `op`: the operation's name and deadline, when one bounds this read.
    fn frame_err_within(&self, e: FrameError, op: Option<(&'static str, Instant)>) -> WorkerError {
        let err = match e {
            FrameError::Deadline { .. } => match op {
                Some((what, end)) if Instant::now() >= end => WorkerError::OperationTimeout {
                    pid: self.pid,
                    what,
                    secs: self.op_timeout.as_secs(),
                },
                _ => WorkerError::Timeout {
                    pid: self.pid,
                    secs: self.timeout.as_secs(),
                },
            },
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                WorkerError::Timeout {
                    pid: self.pid,
                    secs: self.timeout.as_secs(),
                }
            }
            other => WorkerError::Frame {
                pid: self.pid,
                source: other,
            },
        };
        self.kill(err)
    }

    pub fn send(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<(), WorkerError> {
        frame::send_on(&self.sock, msg, fds).map_err(|e| self.frame_err(e))
    }

    pub fn recv(&self) -> Result<FromWorker, WorkerError> {
        self.recv_within(None)
    }

    /// Receive one message, all of it within the per-message timeout (not
    /// per read: a worker trickling bytes gains nothing) and, with `op`,
    /// before the operation's deadline.
    fn recv_within(&self, op: Option<(&'static str, Instant)>) -> Result<FromWorker, WorkerError> {
        let mut by = Instant::now() + self.timeout;
        if let Some((_, end)) = op {
            by = by.min(end);
        }
        let (msg, fds) =
            frame::recv_on_by::<_, FromWorker>(&self.sock, MAX_REQUEST_FRAME, Deadline::at(by))
                .map_err(|e| self.frame_err_within(e, op))?;
        if !fds.is_empty() {
            return Err(self.violation("sent file descriptors".into()));
        }
        Ok(msg)
    }

    /// Refuse to start an exchange while the worker has already said
    /// something: that would be read as the answer to our request, and
    /// every later answer would be one behind.
    fn ensure_quiet(&self) -> Result<(), WorkerError> {
        let mut byte = [0u8; 1];
        // SAFETY: byte is valid for 1 byte; MSG_PEEK leaves the data queued.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            return Err(self.violation(
                "sent an unsolicited message (an answer to a request never made)".into(),
            ));
        }
        // 0 (closed) or EAGAIN (quiet): the exchange itself reports a close.
        Ok(())
    }

    /// Send and expect the one answer that fits `msg` (`Serving` for
    /// `Serve`, `Stats` for `Stats`, `Ok` otherwise), or `Error`.
    pub fn call(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<FromWorker, WorkerError> {
        self.ensure_quiet()?;
        self.send(msg, fds)?;
        match self.recv()? {
            FromWorker::Error(m) => Err(WorkerError::Worker {
                pid: self.pid,
                message: clean(&m),
            }),
            got if answers(msg, &got) => Ok(got),
            got => {
                Err(self.violation(format!("answered {} to {}", variant(&got), to_variant(msg))))
            }
        }
    }

    /// `call` expecting exactly `want`.
    pub fn expect(
        &self,
        msg: &ToWorker,
        fds: &[BorrowedFd<'_>],
        want: &FromWorker,
    ) -> Result<(), WorkerError> {
        let got = self.call(msg, fds)?;
        if &got == want {
            Ok(())
        } else {
            Err(self.violation(format!("answered {} to {}", variant(&got), to_variant(msg))))
        }
    }

    /// Send `Open` or `Unpause` with the leaf and answer the worker's parent
    /// requests with `resolve` until it reports the chain open.
    pub fn open_chain(
        &self,
        msg: &ToWorker,
        leaf: &File,
        resolve: &mut dyn FnMut(ParentRequest) -> Result<(String, File), String>,
    ) -> Result<Opened, WorkerError> {
        let op = ("opening the image chain", Instant::now() + self.op_timeout);
        self.ensure_quiet()?;
        self.send(msg, &[leaf.as_fd()])?;
        for _ in 0..=MAX_CHAIN_DEPTH {
            match self.recv_within(Some(op))? {
                FromWorker::NeedParent {
                    child, locators, ..
                } => {
                    if locators.len() > MAX_LOCATORS {
                        return Err(self.violation(format!(
                            "{} parent locators (limit {MAX_LOCATORS})",
                            locators.len()
                        )));
                    }
                    match resolve(ParentRequest { child, locators }) {
                        Ok((name, file)) => {
                            self.send(&ToWorker::Parent(Ok(name)), &[file.as_fd()])?
                        }
                        Err(why) => self.send(&ToWorker::Parent(Err(why)), &[])?,
                    }
                }
                FromWorker::Opened {
                    virtual_size,
                    chain,
                } => {
                    // Names only (shown and audited), but bounded like the
                    // parent requests that made the chain.
                    if chain.is_empty() || chain.len() > MAX_CHAIN_DEPTH + 1 {
                        return Err(self.violation(format!(
                            "reported a chain of {} images (1 to {} allowed)",
                            chain.len(),
                            MAX_CHAIN_DEPTH + 1
                        )));
                    }
                    return Ok(Opened {
                        virtual_size,
                        chain: chain.iter().map(|c| clean(c)).collect(),
                    });
                }
                FromWorker::Error(m) => {
                    return Err(WorkerError::Worker {
                        pid: self.pid,
                        message: clean(&m),
                    })
                }
                other => {
                    return Err(
                        self.violation(format!("answered {} while opening", variant(&other)))
                    )
                }
            }
        }
        Err(self.violation(format!("chain deeper than {MAX_CHAIN_DEPTH} images")))
    }
}

impl WorkerConn {
    /// A protocol violation: kill the worker and describe it.
    fn violation(&self, what: String) -> WorkerError {
        self.kill(WorkerError::Protocol {
            pid: self.pid,
            what,
        })
    }
}

/// Whether `got` is the (non-error) answer the protocol gives to `msg`.
fn answers(msg: &ToWorker, got: &FromWorker) -> bool {
    matches!(
        (msg, got),
        (ToWorker::Serve(_), FromWorker::Serving)
            | (ToWorker::Stats, FromWorker::Stats(_))
            | (
                ToWorker::Pause | ToWorker::Close | ToWorker::Shutdown,
                FromWorker::Ok
            )
    )
}

fn to_variant(m: &ToWorker) -> &'static str {
    match m {
        ToWorker::Open { .. } => "Open",
        ToWorker::Parent(_) => "Parent",
        ToWorker::Serve(_) => "Serve",
        ToWorker::Pause => "Pause",
        ToWorker::Unpause { .. } => "Unpause",
        ToWorker::Close => "Close",
        ToWorker::Stats => "Stats",
        ToWorker::Shutdown => "Shutdown",
        ToWorker::Resync { .. } => "Resync",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_strips_control_chars_and_caps_length() {
        assert_eq!(clean("a\x1b[2Jb\nc"), "a?[2Jb?c");
        let long = "x".repeat(MAX_WORKER_TEXT + 10);
        assert_eq!(clean(&long).chars().count(), MAX_WORKER_TEXT + 1);
    }

    #[test]
    fn confinement_problem_names_what_is_missing() {
        let ok = sys::ProcInfo {
            uids: [7; 4],
            gids: [7; 4],
            cap_eff: 0,
            no_new_privs: true,
            seccomp: 2,
            start_time: 1,
            net_ns: 1,
            mnt_ns: 2,
            proc_owner: 0,
        };
        assert_eq!(confinement_problem(&ok, 7), None);
        let me = std::process::id();
        let mut bad = ok.clone();
        bad.net_ns = sys::ns_inode(me, "net");
        assert!(confinement_problem(&bad, 7).unwrap().contains("host's net"));
        let mut bad = ok.clone();
        bad.mnt_ns = sys::ns_inode(me, "mnt");
        assert!(confinement_problem(&bad, 7).unwrap().contains("host's mnt"));
        let mut bad = ok.clone();
        bad.proc_owner = 7;
        assert!(confinement_problem(&bad, 7).unwrap().contains("dumpable"));
        let mut bad = ok.clone();
        bad.uids[2] = 0;
        assert!(confinement_problem(&bad, 7).unwrap().contains("uids"));
        let mut bad = ok.clone();
        bad.seccomp = 0;
        assert!(confinement_problem(&bad, 7).unwrap().contains("Seccomp"));
        let mut bad = ok;
        bad.cap_eff = 1;
        assert!(confinement_problem(&bad, 7).unwrap().contains("CapEff"));
    }

    #[test]
    fn worker_conn_times_out_and_refuses_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let conn = WorkerConn::new(a, 42, Duration::from_millis(100)).unwrap();
        assert!(matches!(
            conn.recv(),
            Err(WorkerError::Timeout { pid: 42, .. })
        ));
        let f = File::open("/dev/null").unwrap();
        frame::send_on(&b, &FromWorker::Ok, &[f.as_fd()]).unwrap();
        assert!(matches!(conn.recv(), Err(WorkerError::Protocol { .. })));
    }

    #[test]
    fn worker_conn_refuses_wrong_and_unsolicited_answers() {
        let (a, b) = UnixStream::pair().unwrap();
        let conn = WorkerConn::new(a, 9, Duration::from_secs(5)).unwrap();
        // Serving is no answer to Stats.
        let fake = std::thread::spawn(move || {
            let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            frame::send_on(&b, &FromWorker::Serving, &[]).unwrap();
            b
        });
        let err = conn.call(&ToWorker::Stats, &[]).unwrap_err().to_string();
        assert!(err.contains("answered Serving to Stats"), "{err}");
        let b = fake.join().unwrap();
        // Something said before the broker asks is never taken as the answer.
        frame::send_on(&b, &FromWorker::Ok, &[]).unwrap();
        let err = conn.call(&ToWorker::Pause, &[]).unwrap_err().to_string();
        assert!(err.contains("unsolicited"), "{err}");
        // A quiet worker answering in turn is fine.
        let (a, b) = UnixStream::pair().unwrap();
        let conn = WorkerConn::new(a, 9, Duration::from_secs(5)).unwrap();
        let fake = std::thread::spawn(move || {
            let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            frame::send_on(&b, &FromWorker::Ok, &[]).unwrap();
        });
        assert_eq!(conn.call(&ToWorker::Pause, &[]).unwrap(), FromWorker::Ok);
        fake.join().unwrap();
    }

    #[test]
    fn slow_parent_rounds_cannot_stretch_an_open_past_the_operation_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        // Each round comes well within the 1 s per-message timeout.
        let conn = WorkerConn::new(a, 5, Duration::from_secs(1))
            .unwrap()
            .with_op_timeout(Duration::from_millis(1500));
        let fake = std::thread::spawn(move || {
            let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            let need = FromWorker::NeedParent {
                child: "/srv/a/leaf".into(),
                locators: vec![],
                parent_uuid: [0; 16],
            };
            let mut rounds = 0;
            loop {
                std::thread::sleep(Duration::from_millis(300));
                if frame::send_on(&b, &need, &[]).is_err()
                    || frame::recv_on::<_, ToWorker>(&b, 1 << 16).is_err()
                {
                    return rounds;
                }
                rounds += 1;
            }
        });
        let leaf = File::open("/dev/null").unwrap();
        let msg = ToWorker::Open {
            kind: tapjail_common::proto::ImageKind::Aio,
            name: "/srv/a/leaf".into(),
            read_only: true,
        };
        let t0 = Instant::now();
        let err = conn
            .open_chain(&msg, &leaf, &mut |_| Err("no".into()))
            .unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(err, WorkerError::OperationTimeout { pid: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("operation_timeout_secs"), "{err}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(conn);
        let rounds = fake.join().unwrap();
        assert!((3..=6).contains(&rounds), "{rounds} rounds");
    }

    #[test]
    fn open_chain_answers_parent_requests_then_returns_opened() {
        let (a, b) = UnixStream::pair().unwrap();
        let conn = WorkerConn::new(a, 1, Duration::from_secs(5)).unwrap();
        let fake = std::thread::spawn(move || {
            let (_m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            assert_eq!(fds.len(), 1);
            let need = FromWorker::NeedParent {
                child: "/srv/a/leaf".into(),
                locators: vec![ParentLocator {
                    code: "W2ru".into(),
                    path: "base".into(),
                    relative: true,
                }],
                parent_uuid: [0; 16],
            };
            frame::send_on(&b, &need, &[]).unwrap();
            let (m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            assert_eq!(m, ToWorker::Parent(Ok("/srv/a/base".into())));
            assert_eq!(fds.len(), 1);
            frame::send_on(&b, &need, &[]).unwrap();
            let (m, fds): (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            assert_eq!(m, ToWorker::Parent(Err("no".into())));
            assert!(fds.is_empty());
            let opened = FromWorker::Opened {
                virtual_size: 4096,
                chain: vec!["leaf\x07".into()],
            };
            frame::send_on(&b, &opened, &[]).unwrap();
        });
        let leaf = File::open("/dev/null").unwrap();
        let mut n = 0;
        let msg = ToWorker::Open {
            kind: tapjail_common::proto::ImageKind::Aio,
            name: "/srv/a/leaf".into(),
            read_only: true,
        };
        let opened = conn
            .open_chain(&msg, &leaf, &mut |req| {
                n += 1;
                assert_eq!(req.child, "/srv/a/leaf");
                if n == 1 {
                    Ok(("/srv/a/base".into(), File::open("/dev/null").unwrap()))
                } else {
                    Err("no".into())
                }
            })
            .unwrap();
        assert_eq!(opened.virtual_size, 4096);
        assert_eq!(opened.chain, vec!["leaf?".to_string()]);
        fake.join().unwrap();
    }
}
