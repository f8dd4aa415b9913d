//! `tapdisk`: the confined per-disk worker.
//!
//! ```text
//! tapdisk --broker --frontend nbd|fuse|ublk|nbd-kernel [--uid U --gid G] [--cache auto|buffered]
//!         [--ublk-queues N --ublk-depth D]
//!     Broker mode: the control socket is fd 3 and nothing else is open.
//!     Confines itself, sends Ready, then serves broker requests. For ublk,
//!     the queue geometry the device will have (default: the broker's).
//! tapdisk --nbd SOCKET_PATH -a vhd:PATH|aio:PATH [-R] [--uid U --gid G]
//!         [--export NAME] [--cache auto|buffered]
//!     Standalone: serve one image over NBD on a Unix socket until killed.
//!     As root the worker runs as 65534:65534 unless --uid/--gid say otherwise.
//! ```
//!
//! Exit status: 0 done, 1 runtime failure, 2 usage error.

#[cfg(test)]
mod docs;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use tapjail_common::frame;
use tapjail_common::proto::{FrontendKind, ImageSpec};
use tapjail_common::ublk_abi::UBLK_MAX_QUEUE_DEPTH;
use tapjail_common::worker_proto::{FromWorker, CONTROL_FD, ROOT_DIR_FD, ROOT_NS_FD};
use tapjail_worker::control::Worker;
use tapjail_worker::frontend::ublk::rings::QueueRings;
use tapjail_worker::frontend::ublk::MAX_QUEUES;
use tapjail_worker::io::CacheMode;
use tapjail_worker::sandbox::rings::RingPlan;
use tapjail_worker::sandbox::{self, Ids, Policy};
use tapjail_worker::standalone;

const USAGE: &str = "usage:
  tapdisk --broker --frontend nbd|fuse|ublk|nbd-kernel [--uid U --gid G] [--cache auto|buffered]
          [--ublk-queues N --ublk-depth D] [--root-ns] [--phases [--phases-since NS]]
  tapdisk --nbd SOCKET_PATH -a vhd:PATH|aio:PATH [-R] [--uid U --gid G] [--export NAME]
          [--cache auto|buffered]";

#[derive(Debug, Default)]
struct Args {
    broker: bool,
    frontend: Option<FrontendKind>,
    nbd: Option<String>,
    image: Option<ImageSpec>,
    read_only: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    export: String,
    cache: CacheMode,
    queues: QueueRings,
    selftest: Option<String>,
    /// Log how long each confinement step took (the broker's
    /// `TAPJAIL_PHASES=1` passes it on).
    phases: bool,
    /// CLOCK_MONOTONIC (ns) at the broker's spawn: the phase line then
    /// also says how long exec took and the start before confinement.
    phases_since: Option<u64>,
    /// The broker put its empty-root mount namespace and that root's
    /// directory on fds 4 and 5 to join.
    root_ns: bool,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let value = |argv: &mut dyn Iterator<Item = String>, flag: &str| {
        argv.next().ok_or_else(|| format!("{flag} needs a value"))
    };
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--broker" => a.broker = true,
            "--phases" => a.phases = true,
            "--root-ns" => a.root_ns = true,
            "--phases-since" => {
                let v = value(&mut argv, "--phases-since")?;
                a.phases_since = Some(v.parse().map_err(|_| format!("bad --phases-since {v:?}"))?);
            }
            "--frontend" => {
                a.frontend = Some(match value(&mut argv, "--frontend")?.as_str() {
                    "nbd" => FrontendKind::Nbd,
                    "fuse" => FrontendKind::Fuse,
                    "ublk" => FrontendKind::Ublk,
                    "nbd-kernel" => FrontendKind::NbdKernel,
                    other => {
                        return Err(format!(
                            "unknown frontend {other:?}: use nbd, fuse, ublk or nbd-kernel"
                        ))
                    }
                })
            }
            "--nbd" => a.nbd = Some(value(&mut argv, "--nbd")?),
            "-a" => a.image = Some(value(&mut argv, "-a")?.parse()?),
            "-R" => a.read_only = true,
            "--uid" => a.uid = Some(number(&value(&mut argv, "--uid")?, "--uid")?),
            "--gid" => a.gid = Some(number(&value(&mut argv, "--gid")?, "--gid")?),
            "--export" => a.export = value(&mut argv, "--export")?,
            "--ublk-queues" => {
                let v = value(&mut argv, "--ublk-queues")?;
                a.queues.queues = bounded(&v, "--ublk-queues", MAX_QUEUES)?;
            }
            "--ublk-depth" => {
                let v = value(&mut argv, "--ublk-depth")?;
                a.queues.depth = bounded(&v, "--ublk-depth", UBLK_MAX_QUEUE_DEPTH)?;
            }
            "--cache" => {
                a.cache = match value(&mut argv, "--cache")?.as_str() {
                    "auto" => CacheMode::Auto,
                    "buffered" => CacheMode::Buffered,
                    other => {
                        return Err(format!(
                            "unknown cache mode {other:?}: use auto or buffered"
                        ))
                    }
                }
            }
            // Hidden: confine like a worker, then try something forbidden.
            "--selftest-escape" => a.selftest = Some(value(&mut argv, "--selftest-escape")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn number(s: &str, flag: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| format!("{flag}: {s:?} is not a number"))
}

fn bounded(s: &str, flag: &str, max: u16) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{flag}: {s:?} is not a number from 1 to {max}")),
    }
}

/// The confinement of a broker-mode worker (and of the selftest, which
/// must attack exactly what a real worker has).
fn worker_policy(
    frontend: FrontendKind,
    ids: Option<Ids>,
    keep_fds: Vec<i32>,
    queues: QueueRings,
) -> Policy {
    Policy {
        keep_fds,
        ids,
        frontend,
        rings: RingPlan::for_frontend(frontend, queues),
        fresh_uid: false,
        root_ns: None,
    }
}

fn ids(a: &Args) -> Result<Option<Ids>, String> {
    match (a.uid, a.gid) {
        (Some(uid), Some(gid)) => Ok(Some(Ids { uid, gid })),
        (None, None) => Ok(None),
        _ => Err("--uid and --gid go together".into()),
    }
}

/// A usage error, as plain text (it is the command's answer, not a log
/// line), written once; exit code 2.
fn usage(msg: &str) -> ExitCode {
    let mut text = String::new();
    if !msg.is_empty() {
        text.push_str(&format!("tapdisk: {msg}\n"));
    }
    text.push_str(USAGE);
    text.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    ExitCode::from(2)
}

/// CLOCK_MONOTONIC in nanoseconds (the broker's spawn time is on it).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn main() -> ExitCode {
    let entered = monotonic_ns();
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => return usage(&msg),
    };
    let requested = match ids(&args) {
        Ok(i) => i,
        Err(msg) => return usage(&msg),
    };
    // Before confinement: the filter is read from the environment (which
    // the sandbox then clears) and the output format chosen. A worker (and
    // the selftest, which must log exactly as one) writes JSON lines for
    // the broker to relay; the standalone monitor logs as a command.
    use tapjail_common::logging::{init_lean, Program};
    init_lean(if args.broker || args.selftest.is_some() {
        Program::Worker
    } else {
        Program::Tool
    });
    if let Some(what) = &args.selftest {
        let frontend = args.frontend.unwrap_or(FrontendKind::Nbd);
        return selftest(what, frontend, requested, args.queues);
    }
    match (&args.nbd, args.broker) {
        (Some(socket), false) => {
            let Some(image) = args.image.clone() else {
                return usage("--nbd needs -a TYPE:PATH");
            };
            let ids = match Policy::choose_ids(requested) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            let opts = standalone::Options {
                socket: socket.into(),
                image,
                read_only: args.read_only,
                ids,
                export_name: args.export.clone(),
                cache: args.cache,
            };
            match standalone::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(image = %opts.image.path, "{e}");
                    ExitCode::from(1)
                }
            }
        }
        (None, true) => {
            let Some(frontend) = args.frontend else {
                return usage("--broker needs --frontend");
            };
            let phases = args.phases.then_some((args.phases_since, entered));
            broker(frontend, requested, &args, phases)
        }
        _ => usage(""),
    }
}

/// Broker mode: confine, announce, serve.
fn broker(
    frontend: FrontendKind,
    requested: Option<Ids>,
    args: &Args,
    phases: Option<(Option<u64>, u64)>,
) -> ExitCode {
    let (cache, queues) = (args.cache, args.queues);
    if !is_socket(CONTROL_FD) {
        return usage(&format!(
            "--broker needs the control socket on fd {CONTROL_FD}"
        ));
    }
    // SAFETY: fd 3 is open (checked above) and handed to us by the broker;
    // nothing else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let confining = monotonic_ns();
    let confined = Policy::choose_ids(requested).and_then(|ids| {
        let mut keep = vec![0, 1, 2, CONTROL_FD];
        if args.root_ns {
            keep.extend([ROOT_NS_FD, ROOT_DIR_FD]);
        }
        let mut policy = worker_policy(frontend, ids, keep, queues);
        policy.root_ns = args.root_ns.then_some([ROOT_NS_FD, ROOT_DIR_FD]);
        // The broker chose the uid (`--uid`) none of its workers holds; step
        // 9 checks that nothing else on the host runs as it. nobody (the
        // default as root, and what the standalone monitor passes) is
        // shared by design: nothing to check there.
        policy.fresh_uid = requested.is_some_and(|i| i.uid != sandbox::NOBODY.uid);
        sandbox::confine_timed(&policy)
    });
    match confined {
        Err(e) => {
            tracing::error!("{e}");
            let _ = frame::send_on(&control, &FromWorker::Error(e.to_string()), &[]);
            return ExitCode::from(1);
        }
        Ok(times) if phases.is_some() => {
            // Before the steps: exec (spawn to main, when the broker said
            // when it spawned) and the start up to the first step.
            let mut steps = String::new();
            if let Some((since, entered)) = phases {
                if let Some(since) = since {
                    steps += &format!(" exec_us={}", entered.saturating_sub(since) / 1000);
                }
                steps += &format!(" start_us={}", confining.saturating_sub(entered) / 1000);
            }
            for (n, d) in &times {
                steps += &format!(" {n}_us={}", d.as_micros());
            }
            tapjail_common::log_line!("tapdisk: phases op=confine{steps}");
        }
        Ok(_) => {}
    }
    match Worker::new(control, frontend, cache).run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn is_socket(fd: i32) -> bool {
    // SAFETY: an all-zero stat is valid to overwrite; fstat on any fd number
    // is harmless (EBADF if closed).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK }
}

/// `--selftest-escape WHAT [--frontend F]`: confine exactly as a
/// broker-mode worker for F (NBD by default; without a control socket),
/// then attempt WHAT. Tests run this and assert how it ends: forbidden
/// syscalls kill the process with SIGSYS; `none` exits 0, proving the
/// confinement itself does not kill; `log` logs one event of each level
/// and exits 0, proving the subscriber needs nothing seccomp forbids; `ring-*` submit an operation to a ring
/// made before confinement and exit 0 only if every submission was refused
/// with EACCES (see [`ring_attack`]).
fn selftest(
    what: &str,
    frontend: FrontendKind,
    requested: Option<Ids>,
    queues: QueueRings,
) -> ExitCode {
    let confined = Policy::choose_ids(requested)
        .and_then(|ids| sandbox::confine(&worker_policy(frontend, ids, vec![0, 1, 2], queues)));
    if let Err(e) = confined {
        tracing::error!("{e}");
        return ExitCode::from(1);
    }
    tracing::info!(attempt = what, "selftest: confined; attempting {what}");
    if let Some(op) = what.strip_prefix("ring-") {
        return ring_attack(op, frontend, queues);
    }
    // SAFETY: each arm makes one raw syscall with valid (static or null)
    // arguments; the point is to see the sandbox stop it.
    let rc: i64 = unsafe {
        match what {
            "none" => return ExitCode::SUCCESS,
            "log" => {
                // Logging after confinement: one event of each level, with
                // fields, through the real subscriber (a syscall it needs
                // and seccomp forbids kills the process here).
                tracing::error!(
                    minor = 1u16,
                    pid = std::process::id(),
                    "selftest: error event"
                );
                tracing::warn!(minor = 1u16, image = "x.vhd", "selftest: warn event");
                tracing::info!(request = "open", "selftest: info event");
                tracing::debug!(tenant = "alice", "selftest: debug event");
                tracing::trace!(n = 5u64, "selftest: trace event");
                tapjail_common::log_line!("selftest: log_line event");
                return ExitCode::SUCCESS;
            }
            "open" => libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY).into(),
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()).into()
            }
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into(),
            "ptrace" => libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0),
            "fork" => libc::fork().into(),
            "io_uring_setup" => {
                // The issue 11 escape: a ring of our own, unrestricted.
                let mut params = [0u8; 120]; // struct io_uring_params
                libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr())
            }
            "thread" => {
                // Allowed: threads of this process.
                let t = std::thread::spawn(|| 7);
                return match t.join() {
                    Ok(7) => ExitCode::SUCCESS,
                    _ => ExitCode::from(4),
                };
            }
            other => {
                tracing::error!("selftest: unknown attempt {other:?}");
                return ExitCode::from(2);
            }
        }
    };
    let err = std::io::Error::last_os_error();
    tracing::error!("selftest: {what} returned {rc} ({err}) instead of being stopped");
    ExitCode::from(3)
}

/// Submit `op` (socket, connect, statx, openat) on every kind of ring this
/// worker made before confinement — an image-file ring, and for ublk a
/// queue ring — once as is and once flagged as on a registered file (so
/// both the flags rule and the opcode rule are exercised). Exit 0 if
/// every attempt completed with EACCES, 3 otherwise.
fn ring_attack(op: &str, frontend: FrontendKind, queues: QueueRings) -> ExitCode {
    use io_uring::{opcode, squeue, types};
    use tapjail_worker::io::ring::{run_one, Uring};

    let mut rings: Vec<(&str, Uring)> = Vec::new();
    match tapjail_worker::io::pool::take_for_selftest() {
        Some(r) => rings.push(("image-file ring", r.into_raw())),
        None => {
            tracing::error!("selftest: no pre-made image-file ring");
            return ExitCode::from(3);
        }
    }
    if frontend == FrontendKind::Ublk {
        match tapjail_worker::frontend::ublk::rings::take(queues.depth) {
            Ok(r) => {
                if let Err(e) = r.submitter().register_enable_rings() {
                    tracing::error!("selftest: enabling a ublk queue ring: {e}");
                    return ExitCode::from(3);
                }
                rings.push(("ublk queue ring", r));
            }
            Err(e) => {
                tracing::error!("selftest: no pre-made ublk queue ring: {e}");
                return ExitCode::from(3);
            }
        }
    }
    // Targets of the attack in issue 11: a root-owned socket, root's files.
    let mut addr: libc::sockaddr_un = unsafe_zeroed_sockaddr_un();
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(b"/run/tapjail-attack.sock") {
        *d = *s as libc::c_char;
    }
    let mut statx_buf = [0u8; 256];
    let mut all_refused = true;
    for (name, ring) in &mut rings {
        for fixed in [false, true] {
            let sqe = match op {
                "socket" => opcode::Socket::new(libc::AF_UNIX, libc::SOCK_STREAM, 0).build(),
                "connect" => opcode::Connect::new(
                    types::Fd(0),
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as u32,
                )
                .build(),
                "statx" => opcode::Statx::new(
                    types::Fd(libc::AT_FDCWD),
                    c"/etc/shadow".as_ptr(),
                    statx_buf.as_mut_ptr().cast(),
                )
                .mask(libc::STATX_BASIC_STATS)
                .build(),
                "openat" => {
                    opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/shadow".as_ptr()).build()
                }
                other => {
                    tracing::error!("selftest: unknown ring attempt {other:?}");
                    return ExitCode::from(2);
                }
            };
            let sqe = if fixed {
                sqe.flags(squeue::Flags::FIXED_FILE)
            } else {
                sqe
            };
            // SAFETY: the SQE points at `addr`, `statx_buf` and static
            // strings, all alive until `run_one` returns with the CQE.
            let res = unsafe { run_one(ring, sqe) };
            match res {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    tracing::info!("selftest: {op} on the {name} (fixed={fixed}): refused: {e}");
                }
                other => {
                    tracing::error!(
                        "selftest: {op} on the {name} (fixed={fixed}) was not refused: {other:?}"
                    );
                    all_refused = false;
                }
            }
        }
    }
    if all_refused {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn unsafe_zeroed_sockaddr_un() -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}
