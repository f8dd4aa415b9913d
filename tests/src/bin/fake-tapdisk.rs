//! A stand-in tapdisk for testing the broker's side of the worker protocol
//! where the real worker cannot be used (it lets tests force behaviours:
//! a parent request read from the image, a hang, a crash).
//!
//! It confines itself the minimum the broker checks from outside (own
//! uid/gid, no capabilities, no_new_privs, a permissive seccomp filter),
//! then answers the broker on fd 3. "Images" are raw files; one that starts
//! with `PARENT:<path>\n` asks the broker for that parent (relative
//! locator), `HANG\n` makes Open never answer, `CRASH\n` aborts,
//! `STUBBORN\n` keeps it running after the broker goes away. It never
//! serves real NBD: it accepts and holds client connections.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use tapjail_common::frame;
use tapjail_common::proto::ImageKind;
use tapjail_common::stats::{DriverStats, FrontendStats, ImageStats, WorkerStats};
use tapjail_common::worker_proto::{FromWorker, FrontendSpec, ParentLocator, ToWorker, CONTROL_FD};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn confine(uid: u32, gid: u32) {
    // SAFETY: plain syscalls with integer arguments or pointers to locals.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setresgid(gid, gid, gid), 0);
        assert_eq!(libc::setresuid(uid, uid, uid), 0);
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let mut allow = libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        };
        let prog = libc::sock_fprog {
            len: 1,
            filter: &mut allow,
        };
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog as libc::c_ulong,
                0,
                0
            ),
            0
        );
    }
}

/// Set by a `STUBBORN` image: outlive the broker.
static STUBBORN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Chain {
    names: Vec<String>,
    size: u64,
    kind: ImageKind,
}

fn open(
    ctl: &UnixStream,
    kind: ImageKind,
    name: String,
    fds: Vec<OwnedFd>,
) -> Result<Chain, String> {
    let fd = fds.into_iter().next().ok_or("no image fd")?;
    let mut file = File::from(fd);
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; 512];
    let n = file.read(&mut head).map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    let mut names = vec![name.clone()];
    if head.starts_with("HANG\n") {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    if head.starts_with("CRASH\n") {
        std::process::abort();
    }
    if head.starts_with("STUBBORN\n") {
        STUBBORN.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(rest) = head.strip_prefix("PARENT:") {
        let loc = rest.lines().next().unwrap_or("").to_string();
        let relative = !loc.starts_with('/');
        let need = FromWorker::NeedParent {
            child: name,
            locators: vec![ParentLocator {
                code: if relative { "W2ru" } else { "W2ku" }.into(),
                path: loc,
                relative,
            }],
            parent_uuid: [0; 16],
        };
        frame::send_on(ctl, &need, &[]).map_err(|e| e.to_string())?;
        let (reply, pfds): (ToWorker, _) =
            frame::recv_on(ctl, 1 << 16).map_err(|e| e.to_string())?;
        match reply {
            ToWorker::Parent(Ok(pname)) if pfds.len() == 1 => names.push(pname),
            ToWorker::Parent(Err(why)) => return Err(format!("parent refused: {why}")),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(Chain { names, size, kind })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--broker") {
        eprintln!("fake-tapdisk: only --broker mode");
        std::process::exit(2);
    }
    let uid: u32 = arg(&args, "--uid")
        .and_then(|v| v.parse().ok())
        .unwrap_or(65534);
    let gid: u32 = arg(&args, "--gid")
        .and_then(|v| v.parse().ok())
        .unwrap_or(65534);
    // SAFETY: fd 3 is the control socket the broker handed us.
    let ctl = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    confine(uid, gid);
    let send = |m: &FromWorker| frame::send_on(&ctl, m, &[]).is_ok();
    send(&FromWorker::Ready {
        pid: std::process::id(),
    });
    let mut chain: Option<Chain> = None;
    let mut listeners: Vec<UnixListener> = Vec::new();
    loop {
        let Ok((msg, fds)) = frame::recv_on::<_, ToWorker>(&ctl, 1 << 16) else {
            while STUBBORN.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            std::process::exit(0);
        };
        let reply = match msg {
            ToWorker::Open { kind, name, .. } | ToWorker::Unpause { kind, name, .. } => {
                match open(&ctl, kind, name, fds) {
                    Ok(c) => {
                        let r = FromWorker::Opened {
                            virtual_size: c.size,
                            chain: c.names.clone(),
                        };
                        chain = Some(c);
                        r
                    }
                    Err(e) => FromWorker::Error(e),
                }
            }
            ToWorker::Serve(FrontendSpec::Nbd { .. }) => match fds.into_iter().next() {
                Some(fd) => {
                    let l = UnixListener::from(fd);
                    let l2 = l.try_clone().expect("dup");
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for c in l2.incoming().flatten() {
                            held.push(c);
                        }
                    });
                    listeners.push(l);
                    FromWorker::Serving
                }
                None => FromWorker::Error("no listening socket".into()),
            },
            ToWorker::Serve(other) => {
                FromWorker::Error(format!("fake-tapdisk cannot serve {:?}", other.kind()))
            }
            ToWorker::Pause => FromWorker::Ok,
            ToWorker::Close => {
                chain = None;
                listeners.clear();
                FromWorker::Ok
            }
            ToWorker::Stats => {
                let c = chain.as_ref();
                FromWorker::Stats(Box::new(WorkerStats {
                    name: c
                        .map(|c| format!("{}:{}", c.kind, c.names[0]))
                        .unwrap_or_default(),
                    secs: [0, 0],
                    images: c
                        .map(|c| {
                            c.names
                                .iter()
                                .map(|n| ImageStats {
                                    name: n.clone(),
                                    driver: DriverStats {
                                        kind: if c.kind == ImageKind::Vhd { 4 } else { 0 },
                                        name: c.kind.to_string(),
                                        status: None,
                                    },
                                    ..Default::default()
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    reqs_outstanding: 0,
                    frontend: FrontendStats {
                        kind: "nbd".into(),
                        ..Default::default()
                    },
                    latency: Default::default(),
                }))
            }
            ToWorker::Shutdown => std::process::exit(0),
            ToWorker::Parent(_) => FromWorker::Error("unexpected Parent".into()),
        };
        if !send(&reply) {
            std::process::exit(0);
        }
    }
}
