//! Starting a tapdisk process and checking, from outside, that it is
//! confined before the broker uses it.
//!
//! A worker is the tapdisk binary started by a vfork-style clone
//! ([`tapjail_broker::spawn`]: constant cost however much the broker holds), with an environment of
//! only `TAPJAIL_LOG` (the broker's log filter), `/` as its directory, `/dev/null` on stdin/stdout, a pipe
//! the broker reads on stderr (`worker_log`: tagged, escaped, bounded
//! lines, never raw bytes in the journal), the control socket as fd 3 and
//! nothing else, RLIMIT_MEMLOCK set, in its own process group (so a Ctrl-C
//! aimed at a foreground broker reaches only the broker, which then shuts
//! workers down in order). It confines itself, drops to the uid/gid given on
//! its command line and says `Ready`; the broker then checks in `/proc`
//! that it really is confined ([`confinement_problem`]).

use crate::broker::SpawnConfig;
use crate::sys;
use crate::worker::{clean, variant, WorkerConn, WorkerError};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use tapjail_common::proto::FrontendKind;
use tapjail_common::worker_proto::{FromWorker, CONTROL_FD};

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

/// Start a worker running as `uid`/`uid` for `frontend` and wait for it to
/// be confined.
/// With `cgroup`, the child enters it before `exec`: the worker runs no
/// instruction of its own outside it.
pub fn spawn(
    cfg: &SpawnConfig,
    frontend: FrontendKind,
    uid: u32,
    cgroup: Option<&tapjail_broker::cgroup::Leaf>,
) -> Result<Spawned, WorkerError> {
    let procs = match cgroup {
        Some(l) => Some(l.procs().map_err(|e| WorkerError::Spawn {
            path: cfg.tapdisk.display().to_string(),
            source: io::Error::other(e.to_string()),
        })?),
        None => None,
    };
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    let (ours, theirs) = UnixStream::pair()?; // both CLOEXEC
    let (log_r, log_w) = crate::worker_log::pipe()?;
    let root = tapjail_broker::worker_root::WorkerRoot::shared();
    let args = Args {
        frontend: frontend.as_str(),
        uid: uid.to_string(),
        spawned_at: sys::monotonic_ns().to_string(),
        root_ns: root.is_some(),
    };
    let root_fd = root.map(|r| r.raw_fds());
    let (pid, pidfd) = if fork_spawn() {
        fork_exec(cfg, &args, theirs.as_raw_fd(), log_w, procs_fd, root_fd)?
    } else {
        vfork_exec(cfg, &args, theirs.as_raw_fd(), log_w, procs_fd, root_fd)?
    };
    tapjail_broker::phases::lap("fork_exec");
    drop(theirs);
    drop(procs);
    let keep = match &cfg.store {
        Some(_) => Some((ours.try_clone()?, OwnedFd::from(log_r.try_clone()?))),
        None => None,
    };
    crate::worker_log::forward(log_r, pid);
    let pidfd = Arc::new(pidfd);
    let mut conn = WorkerConn::new(ours, pid, cfg.timeout)?.with_op_timeout(cfg.op_timeout);
    conn.set_pidfd(pidfd.clone());
    let fail = |e: WorkerError| {
        sys::kill_and_reap(pidfd.as_fd());
        e
    };
    tapjail_broker::phases::lap("spawn_rest");
    let ready = conn.recv().map_err(fail)?;
    tapjail_broker::phases::lap("worker_confine");
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
    if let Some(r) = root.filter(|r| info.mnt_ns != r.inode()) {
        let what = format!(
            "in mount namespace {}, not the empty root's ({})",
            info.mnt_ns,
            r.inode()
        );
        return Err(fail(WorkerError::NotConfined { pid, what }));
    }
    tapjail_broker::phases::lap("confine_check");
    let kept = match (&cfg.store, &keep) {
        (Some(store), Some((ctl, log))) => {
            let [c, l] = kept_names(pid);
            match tapjail_broker::fdstore::Kept::put(store, &[(c, ctl.as_fd()), (l, log.as_fd())]) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(
                        pid,
                        "tapdisk {pid}: cannot keep its control socket in the {}: {e}; \
                         it would not survive a broker restart",
                        store.kind()
                    );
                    None
                }
            }
        }
        _ => None,
    };
    tapjail_broker::phases::lap("fdstore");
    Ok(Spawned {
        kept,
        pid,
        pidfd,
        conn,
        start_time: info.start_time,
    })
}

/// The worker's command line beyond the program.
struct Args {
    frontend: &'static str,
    uid: String,
    /// CLOCK_MONOTONIC at the spawn, for the worker's phase line.
    spawned_at: String,
    /// The empty root's namespace and directory are on fds 4 and 5 for
    /// the worker to join.
    root_ns: bool,
}

impl Args {
    fn list(&self) -> Vec<&OsStr> {
        let mut v: Vec<&OsStr> = [
            "--broker",
            "--frontend",
            self.frontend,
            "--uid",
            &self.uid,
            "--gid",
            &self.uid,
        ]
        .into_iter()
        .map(OsStr::new)
        .collect();
        if self.root_ns {
            v.push(OsStr::new("--root-ns"));
        }
        if tapjail_broker::phases::enabled() {
            v.push(OsStr::new("--phases"));
            v.push(OsStr::new("--phases-since"));
            v.push(OsStr::new(&self.spawned_at));
        }
        v
    }
}

/// `TAPJAIL_SPAWN=fork` (read once): start workers with std's
/// `fork`+`exec` instead of the vfork-style clone, to measure one against
/// the other (`bench/control-plane.sh`'s `SPAWN=fork`).
fn fork_spawn() -> bool {
    static FORK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORK.get_or_init(|| std::env::var("TAPJAIL_SPAWN").is_ok_and(|v| v == "fork"))
}

fn spawn_error(cfg: &SpawnConfig, source: io::Error) -> WorkerError {
    WorkerError::Spawn {
        path: cfg.tapdisk.display().to_string(),
        source,
    }
}

/// Start the worker with [`tapjail_broker::spawn::spawn_lean`]: no copy of
/// the broker's address space nor of its fd table, so its cost does not
/// grow with attached disks.
fn vfork_exec(
    cfg: &SpawnConfig,
    args: &Args,
    control: i32,
    log_w: io::PipeWriter,
    cgroup_procs: Option<i32>,
    root: Option<[i32; 2]>,
) -> Result<(u32, OwnedFd), WorkerError> {
    let null = std::fs::File::open("/dev/null")?;
    let filter = tapjail_common::logging::effective_filter();
    let child = tapjail_broker::spawn::spawn_lean(
        &cfg.tapdisk,
        &args.list(),
        // Its one variable: log with the broker's filter (read before the
        // worker clears its environment).
        &[(tapjail_common::logging::FILTER_ENV, filter)],
        tapjail_broker::spawn::Setup {
            cgroup_procs,
            new_process_group: true,
            stdio: Some([null.as_raw_fd(), null.as_raw_fd(), log_w.as_raw_fd()]),
            control: Some(control),
            root,
            memlock: Some(cfg.memlock),
            cloexec_rest: true,
        },
    )
    .map_err(|e| spawn_error(cfg, e.into_io()))?;
    // The child holds the only write end of its log pipe now.
    drop(log_w);
    Ok((child.pid, child.pidfd))
}

/// The old way (std's `Command`: `fork`, the steps in `pre_exec`, `exec`),
/// kept as the baseline the vfork-style spawn is measured against.
fn fork_exec(
    cfg: &SpawnConfig,
    args: &Args,
    child_fd: i32,
    log_w: io::PipeWriter,
    procs_fd: Option<i32>,
    root: Option<[i32; 2]>,
) -> Result<(u32, OwnedFd), WorkerError> {
    let memlock = cfg.memlock;
    let mut cmd = Command::new(&cfg.tapdisk);
    cmd.args(args.list())
        .env_clear()
        .env(
            tapjail_common::logging::FILTER_ENV,
            tapjail_common::logging::effective_filter(),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_w))
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (dup2, fcntl, setrlimit,
    // close_range) on plain integers; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || child_setup(child_fd, memlock, procs_fd, root));
    }
    let child = cmd.spawn().map_err(|e| spawn_error(cfg, e))?;
    // The child holds the only write end now (the Command's copy goes with it).
    drop(cmd);
    let pid = child.id();
    // The child is ours and not yet reaped, so its pid cannot have been
    // reused: this pidfd names exactly it. The supervisor reaps through it.
    let pidfd = sys::pidfd_open(pid)?;
    drop(child);
    Ok((pid, pidfd))
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

/// In the forked child: into its cgroup (writing `0` to the cgroup's
/// `cgroup.procs` moves the writer), control socket to fd 3, memlock
/// limit, and every other fd above 3 marked close-on-exec (not closed, so
/// std's exec-error pipe still works).
fn child_setup(
    child_fd: i32,
    memlock: u64,
    cgroup_procs: Option<i32>,
    root: Option<[i32; 2]>,
) -> io::Result<()> {
    let check = |rc: i32| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // The broker blocks its termination signals (a thread sigwaits for
    // them); the mask survives exec, so clear it for the worker.
    tapjail_common::signals::unblock_all()?;
    if let Some(fd) = cgroup_procs {
        // SAFETY: write of a 1-byte static buffer to an fd the parent
        // opened for us (close-on-exec, so the worker never has it).
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    if child_fd == CONTROL_FD {
        // SAFETY: fcntl on an fd this process owns; integer arguments.
        check(unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) })?;
    } else {
        // SAFETY: dup2 onto fd 3; dup2 clears FD_CLOEXEC on the new fd.
        check(unsafe { libc::dup2(child_fd, CONTROL_FD) })?;
    }
    if let Some([ns, dir]) = root {
        // SAFETY: dup2 onto fds 4 and 5; dup2 clears FD_CLOEXEC on them.
        check(unsafe { libc::dup2(ns, tapjail_broker::spawn::ROOT_NS_FD) })?;
        // SAFETY: as above.
        check(unsafe { libc::dup2(dir, tapjail_broker::spawn::ROOT_DIR_FD) })?;
    }
    let lim = libc::rlimit {
        rlim_cur: memlock,
        rlim_max: memlock,
    };
    // SAFETY: setrlimit reads the struct we pass by reference.
    check(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) })?;
    let first = if root.is_some() {
        tapjail_broker::spawn::ROOT_DIR_FD + 1
    } else {
        CONTROL_FD + 1
    };
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check(i32::try_from(rc).unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
