//! Standalone mode, `tapdisk --nbd SOCKET -a TYPE:PATH`: qemu-nbd-style
//! serving without a broker, with the same confinement.
//!
//! # Privilege separation
//! The worker must be confined before it parses a byte of the image, yet the
//! parents of a differencing image are known only after parsing it. So
//! standalone mode splits in two processes, OpenSSH-privsep style:
//!
//! - this process, the **monitor**, stays unconfined but never reads image
//!   contents: it opens the leaf image and binds the listening socket, then
//!   answers a confined worker's requests exactly as the broker would;
//! - the **worker** is `tapdisk --broker --frontend nbd` itself, exec'd with
//!   one end of a socketpair as fd 3 (nothing else but stdio), which
//!   confines itself before reading any message and then speaks the broker
//!   protocol (`common::worker_proto`): `Open` with the leaf fd, any number
//!   of `NeedParent`/`Parent`, `Serve` with the listening socket.
//!
//! Parent requests come from a worker that parsed a possibly hostile image,
//! so the monitor treats them as untrusted: it opens a parent only as a
//! regular file *beneath the leaf's directory* (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV`, through the same wrapper the broker uses with its allowed roots), read-only, and at
//! most [`crate::control::MAX_PARENTS`] times. An image cannot make a root
//! monitor hand out `/etc/shadow`.
//!
//! SIGINT/SIGTERM/SIGHUP make the monitor ask the worker to flush and shut
//! down; if the worker dies, the monitor exits with an error. The socket
//! path is removed on exit.

use crate::control::MAX_PARENTS;
use crate::io::CacheMode;
use crate::sandbox::Ids;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_common::proto::{FrontendKind, ImageSpec};
use tapjail_common::signals::Blocked;
use tapjail_common::worker_proto::{FromWorker, FrontendSpec, ParentLocator, ToWorker, CONTROL_FD};

/// What `tapdisk --nbd` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub image: ImageSpec,
    pub read_only: bool,
    pub ids: Option<Ids>,
    pub export_name: String,
    pub cache: CacheMode,
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("{what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
    #[error("talking to the worker: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("worker: {0}")]
    Worker(String),
    #[error("worker exited: {0}{hint}", hint = died_hint(*.0))]
    WorkerDied(std::process::ExitStatus),
}

fn died_hint(status: std::process::ExitStatus) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGSYS) => " (SIGSYS: a syscall outside the seccomp allowlist)",
        Some(libc::SIGKILL) => " (SIGKILL)",
        _ => "",
    }
}

/// The monitor's end: spawn, drive and supervise a worker.
pub fn run(opts: &Options) -> Result<(), StandaloneError> {
    let leaf = std::fs::OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&opts.image.path)
        .map_err(|source| StandaloneError::Path {
            what: "opening image",
            path: opts.image.path.clone().into(),
            source,
        })?;
    if !leaf
        .metadata()
        .map_err(|e| StandaloneError::Io("stat image", e))?
        .is_file()
    {
        return Err(StandaloneError::Path {
            what: "image is not a regular file:",
            path: opts.image.path.clone().into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    let leaf_dir = parent_dir(Path::new(&opts.image.path))?;
    let listener = listen(&opts.socket)?;
    let _unlink = Unlink(opts.socket.clone());
    let signals = block_signals()?;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| StandaloneError::Io("socketpair", e))?;
    let mut child = spawn_worker(opts, OwnedFd::from(theirs))?;
    let ours = OwnedFd::from(ours);
    let served = drive(opts, ours.as_fd(), leaf.into(), listener, &leaf_dir);
    if let Err(e) = served {
        // If the worker died, say how: that is the real error.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StandaloneError::WorkerDied(status));
        }
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    tracing::info!(
        worker_pid = child.id(),
        image = %opts.image.path,
        "serving {}:{} on nbd+unix:///{}?socket={} (worker pid {})",
        opts.image.kind,
        opts.image.path,
        opts.export_name,
        opts.socket.display(),
        child.id()
    );
    supervise(&signals, ours.as_fd(), &mut child)
}

/// Removes the socket path when dropped.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn parent_dir(path: &Path) -> Result<OwnedFd, StandaloneError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| StandaloneError::Path {
            what: "opening image directory",
            path: dir.into(),
            source,
        })?;
    Ok(f.into())
}

/// Bind and listen on `path`, replacing a stale socket (never another file).
fn listen(path: &Path) -> Result<OwnedFd, StandaloneError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(StandaloneError::Path {
                what: "refusing to replace non-socket",
                path: path.into(),
                source: io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let l =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| StandaloneError::Path {
            what: "binding NBD socket",
            path: path.into(),
            source,
        })?;
    Ok(l.into())
}

fn spawn_worker(opts: &Options, control: OwnedFd) -> Result<Child, StandaloneError> {
    let exe = std::env::current_exe().map_err(|e| StandaloneError::Io("finding tapdisk", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--broker")
        .arg("--frontend")
        .arg(FrontendKind::Nbd.as_str())
        .arg("--cache")
        .arg(match opts.cache {
            CacheMode::Auto => "auto",
            CacheMode::Buffered => "buffered",
        })
        .env_clear()
        .stdin(Stdio::null());
    if let Some(ids) = opts.ids {
        cmd.arg("--uid")
            .arg(ids.uid.to_string())
            .arg("--gid")
            .arg(ids.gid.to_string());
    }
    let raw = control.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls async-signal-safe dup2/fcntl on fds that exist there.
    unsafe {
        cmd.pre_exec(move || {
            if raw == CONTROL_FD {
                // Already in place: just clear close-on-exec.
                if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CONTROL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| StandaloneError::Io("starting the worker", e))?;
    drop(control);
    Ok(child)
}

fn expect(sock: std::os::fd::BorrowedFd<'_>) -> Result<FromWorker, StandaloneError> {
    let (msg, _fds): (FromWorker, _) = frame::recv(sock, MAX_REQUEST_FRAME)?;
    match msg {
        FromWorker::Error(e) => Err(StandaloneError::Worker(e)),
        m => Ok(m),
    }
}

/// Take the worker from Ready to Serving.
fn drive(
    opts: &Options,
    sock: std::os::fd::BorrowedFd<'_>,
    leaf: OwnedFd,
    listener: OwnedFd,
    leaf_dir: &OwnedFd,
) -> Result<(), StandaloneError> {
    match expect(sock)? {
        FromWorker::Ready { .. } => {}
        m => {
            return Err(StandaloneError::Worker(format!(
                "expected Ready, got {m:?}"
            )))
        }
    }
    let open = ToWorker::Open {
        kind: opts.image.kind,
        name: opts.image.path.clone(),
        read_only: opts.read_only,
    };
    frame::send(sock, &open, &[leaf.as_fd()])?;
    drop(leaf);
    let mut asked = 0;
    loop {
        match expect(sock)? {
            FromWorker::Opened { .. } => break,
            FromWorker::NeedParent { locators, .. } => {
                asked += 1;
                let answer = if asked > MAX_PARENTS {
                    Err(format!("chain longer than {MAX_PARENTS} images"))
                } else {
                    open_parent(leaf_dir, &locators)
                };
                match answer {
                    Ok((name, fd)) => {
                        frame::send(sock, &ToWorker::Parent(Ok(name)), &[fd.as_fd()])?
                    }
                    Err(why) => frame::send(sock, &ToWorker::Parent(Err(why)), &[])?,
                }
            }
            m => {
                return Err(StandaloneError::Worker(format!(
                    "expected Opened, got {m:?}"
                )))
            }
        }
    }
    let serve = ToWorker::Serve(FrontendSpec::Nbd {
        export_name: opts.export_name.clone(),
    });
    frame::send(sock, &serve, &[listener.as_fd()])?;
    drop(listener);
    match expect(sock)? {
        FromWorker::Serving => Ok(()),
        m => Err(StandaloneError::Worker(format!(
            "expected Serving, got {m:?}"
        ))),
    }
}

/// A locator as a path relative to the leaf's directory, or `None` if it
/// does not stay beneath it.
fn beneath(leaf_dir: &OwnedFd, loc: &ParentLocator) -> Option<PathBuf> {
    let p = Path::new(&loc.path);
    let rel: PathBuf = if loc.relative || p.is_relative() {
        p.to_path_buf()
    } else {
        // An absolute locator is usable when it names a file in the leaf's
        // directory tree; find that directory's path through /proc.
        let dir = std::fs::read_link(format!("/proc/self/fd/{}", leaf_dir.as_raw_fd())).ok()?;
        p.strip_prefix(&dir).ok()?.to_path_buf()
    };
    let clean = rel
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect::<PathBuf>();
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Open a parent read-only beneath the leaf's directory, with the rules
/// the broker applies (`tapjail_common::sys::open_beneath`); an error
/// says which rule refused it.
fn openat2_beneath(dir: &OwnedFd, rel: &Path) -> Result<OwnedFd, String> {
    let shown = rel.display().to_string();
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| format!("parent path {shown:?} contains a NUL byte"))?;
    let (fd, _) = tapjail_common::sys::open_beneath(dir.as_fd(), &c, false)
        .map_err(|e| e.parent_refusal(&shown, "the image's directory"))?;
    Ok(fd)
}

/// Try the worker's locators in order; the first that opens wins.
fn open_parent(
    leaf_dir: &OwnedFd,
    locators: &[ParentLocator],
) -> Result<(String, OwnedFd), String> {
    let mut tried = Vec::new();
    for loc in locators.iter().take(16) {
        let Some(rel) = beneath(leaf_dir, loc) else {
            tried.push(format!(
                "{} {:?}: outside the image's directory",
                loc.code, loc.path
            ));
            continue;
        };
        match openat2_beneath(leaf_dir, &rel) {
            Ok(fd) => return Ok((rel.display().to_string(), fd)),
            Err(why) => tried.push(format!("{} {:?}: {why}", loc.code, loc.path)),
        }
    }
    Err(format!(
        "no parent locator could be opened ({})",
        tried.join("; ")
    ))
}

/// Signals the monitor waits for, blocked so that `sigwait` takes them.
fn block_signals() -> Result<Blocked, StandaloneError> {
    tapjail_common::signals::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD])
        .map_err(|e| StandaloneError::Io("blocking signals", e))
}

/// Wait for a signal or the worker's death.
fn supervise(
    signals: &Blocked,
    sock: std::os::fd::BorrowedFd<'_>,
    child: &mut Child,
) -> Result<(), StandaloneError> {
    loop {
        let Ok(sig) = signals.wait() else {
            continue;
        };
        if sig == libc::SIGCHLD {
            match child.try_wait() {
                Ok(Some(status)) => return Err(StandaloneError::WorkerDied(status)),
                _ => continue,
            }
        }
        // Ask for a clean shutdown (flush), then wait.
        let asked = frame::send(sock, &ToWorker::Shutdown, &[]).is_ok()
            && matches!(
                frame::recv::<FromWorker>(sock, MAX_REQUEST_FRAME),
                Ok((FromWorker::Ok, _))
            );
        if !asked {
            let _ = child.kill();
        }
        let status = child
            .wait()
            .map_err(|e| StandaloneError::Io("waiting for the worker", e))?;
        return if asked && status.success() {
            Ok(())
        } else {
            Err(StandaloneError::WorkerDied(status))
        };
    }
}
