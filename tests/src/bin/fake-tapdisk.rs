//! A stand-in tapdisk for testing the broker's side of the worker protocol
//! where the real worker cannot be used (it lets tests force behaviours:
//! a parent request read from the image, a hang, a crash).
//!
//! It confines itself the minimum the broker checks from outside (own
//! network and mount namespaces, own uid/gid, not dumpable, no
//! capabilities, no_new_privs, a permissive seccomp filter),
//! then answers the broker on fd 3. "Images" are raw files; one that starts
//! with `PARENT:<path>\n` asks the broker for that parent (relative
//! locator), `HANG\n` makes Open never answer, `CRASH\n` aborts,
//! `STUBBORN\n` keeps it running after the broker goes away. It never
//! serves real NBD: it accepts and holds client connections.
//!
//! Hostile behaviours (a worker taken over by its image, in
//! `tests/tests/e2e/hostile_worker.rs`), chosen by the image's first line:
//! - `GARBAGE` answers Open with a frame whose payload is not a `FromWorker`;
//!   `NOISE` answers with bytes that are not a frame at all;
//! - `FRAMELEN:<n>:hang|close` sends a header claiming `n` bytes, 3 bytes of
//!   payload, then hangs or exits;
//! - `REPLY:<msg>` answers Open with `<msg>` (see [`forged`]) instead of
//!   `Opened` (`LongChain`, `NoChain`: an `Opened` with 20000 or no
//!   images); `EXTRA:<msg>` sends `<msg>` right after `Opened`;
//!   `LATE:<msg>` sends `<msg>` unasked 300 ms after `Serving`;
//! - `FLOOD:<n>:<path>` asks for the parent `<path>` `n` times;
//!   `LOCATORS:<n>:<path>` asks once with `n` locators;
//!   `LONGPARENT:<n>` asks for a parent path of `2n` bytes;
//!   `CHILD:<child>:<path>` asks for the parent of a file it was never given;
//!   `SLOWPARENT:<n>:<ms>:<path>` asks for `<path>` `n` times, waiting
//!   `<ms>` before each request (each in time, the whole open not);
//! - `STDERR` writes terminal escapes, forged broker lines (plain and JSON,
//!   claiming minor 999), a 100 KB line and 5000 lines to its stderr, then
//!   opens normally;
//! - `FDS:<n>` answers Open with `n` fds attached (on the header, or with
//!   `FDS:<n>:payload` on the payload bytes); `LATEFDS:<frames>:<n>` sends
//!   `frames` unasked frames with `n` fds each after `Serving`;
//! - `HOG:<mib>` touches `mib` MiB of fresh memory after `Serving`, and
//!   `THREADS:<n>` starts `n` threads (saying how many it got): a worker
//!   trying to take the host's memory or tasks (`e2e cgroup::`).
//!
//! It says on stderr (the broker's log) when a delayed act is done
//! (`fake-tapdisk PID: sent unasked`, `fake-tapdisk PID: hanging on Open`),
//! so tests wait for that event instead of sleeping.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// `skip`: a confinement step to leave out (see `WorkerBin::FakeSkipping`).
/// `root_ns`: the broker passed `--root-ns` (its empty-root mount
/// namespace on fd 4), which the fake joins unless `skip` is `"rootns"`
/// (then it makes a mount namespace of its own, as a standalone worker
/// would: not the one the broker checks for).
fn confine(uid: u32, gid: u32, skip: &str, root_ns: bool) {
    // SAFETY: plain syscalls with integer arguments or pointers to locals.
    unsafe {
        if skip != "hostns" {
            if root_ns && skip != "rootns" {
                assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0);
                assert_eq!(libc::setns(4, libc::CLONE_NEWNS), 0);
            } else {
                assert_eq!(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS), 0);
            }
        }
        libc::close(4);
        libc::close(5);
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setresgid(gid, gid, gid), 0);
        if skip != "uid" {
            assert_eq!(libc::setresuid(uid, uid, uid), 0);
        }
        let dumpable = libc::c_ulong::from(skip == "dumpable");
        assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, dumpable, 0, 0, 0), 0);
        if skip == "nnp" {
            // Without no_new_privs an unprivileged process cannot load a
            // seccomp filter either.
            return;
        }
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        if skip == "seccomp" {
            return;
        }
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
    /// The image's first line, for the hostile behaviours that act later.
    line: String,
}

/// A message named in a hostile image, sent where it does not belong.
fn forged(name: &str) -> FromWorker {
    match name {
        "Ready" => FromWorker::Ready {
            pid: std::process::id(),
        },
        "Serving" => FromWorker::Serving,
        "Ok" => FromWorker::Ok,
        "Stats" => FromWorker::Stats(Box::new(WorkerStats {
            name: "FORGED".into(),
            ..Default::default()
        })),
        "Opened" => FromWorker::Opened {
            virtual_size: 1 << 20,
            chain: vec!["FORGED".into()],
        },
        "LongChain" => FromWorker::Opened {
            virtual_size: 1 << 20,
            chain: vec!["x".into(); 20_000],
        },
        "NoChain" => FromWorker::Opened {
            virtual_size: 1 << 20,
            chain: Vec::new(),
        },
        "NeedParent" => FromWorker::NeedParent {
            child: "FORGED".into(),
            locators: Vec::new(),
            parent_uuid: [0; 16],
        },
        other => FromWorker::Error(format!("FORGED {other}")),
    }
}

/// `sendmsg` with any number of fds (the frame module refuses more than
/// `MAX_FDS`, which is what the test is about).
fn send_raw_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) {
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is valid; control holds one cmsg with all fds;
    // iov and control outlive the sendmsg call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
    }
}

/// Send `msg` framed, with `n` fds on the header or on the payload.
fn send_with_fds(ctl: &UnixStream, msg: &FromWorker, n: usize, on_payload: bool) {
    let payload = postcard::to_allocvec(msg).expect("encode");
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    // Copies of stderr: the fake runs in the broker's empty root, where
    // no path (not even /dev/null) exists.
    let files: Vec<OwnedFd> = (0..n)
        .map(|_| {
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .expect("dup stderr")
        })
        .collect();
    let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    // The SCM_RIGHTS limit per message is 253 fds.
    let raw = &raw[..raw.len().min(253)];
    if on_payload {
        let _ = (&*ctl).write_all(&frame[..4]);
        send_raw_fds(ctl.as_raw_fd(), &frame[4..], raw);
    } else {
        send_raw_fds(ctl.as_raw_fd(), &frame, raw);
    }
}

/// Ask for a parent and wait for the answer; the parent's name on success.
fn need_parent(
    ctl: &UnixStream,
    child: String,
    locators: Vec<ParentLocator>,
) -> Result<String, String> {
    let need = FromWorker::NeedParent {
        child,
        locators,
        parent_uuid: [0; 16],
    };
    frame::send_on(ctl, &need, &[]).map_err(|e| e.to_string())?;
    let (reply, pfds): (ToWorker, _) = frame::recv_on(ctl, 1 << 16).map_err(|e| e.to_string())?;
    match reply {
        ToWorker::Parent(Ok(pname)) if pfds.len() == 1 => Ok(pname),
        ToWorker::Parent(Err(why)) => Err(format!("parent refused: {why}")),
        other => Err(format!("unexpected {other:?}")),
    }
}

fn locator(path: &str) -> ParentLocator {
    let relative = !path.starts_with('/');
    ParentLocator {
        code: if relative { "W2ru" } else { "W2ku" }.into(),
        path: path.into(),
        relative,
    }
}

/// Behaviours that act while the broker waits for the answer to Open.
/// `Some(reply)` replaces the normal answer.
fn hostile_open(ctl: &UnixStream, name: &str, line: &str) -> Option<Result<Chain, String>> {
    let mut w = ctl;
    let (word, rest) = line.split_once(':').unwrap_or((line, ""));
    let sleep = || std::thread::sleep(std::time::Duration::from_secs(3600));
    match word {
        "GARBAGE" => {
            // A well-formed header, then a payload no FromWorker decodes from
            // (variant index 0xff.. is out of range).
            let _ = w.write_all(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x42]);
            sleep();
        }
        "NOISE" => {
            let _ = w.write_all(b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n\x00\xff\xfe");
            sleep();
        }
        "FRAMELEN" => {
            let (n, then) = rest.split_once(':').unwrap_or((rest, "hang"));
            let n: u32 = n.parse().unwrap_or(u32::MAX);
            let _ = w.write_all(&n.to_be_bytes());
            let _ = w.write_all(&[1, 2, 3]);
            if then == "close" {
                std::process::exit(0);
            }
            sleep();
        }
        "REPLY" => {
            let _ = frame::send_on(ctl, &forged(rest), &[]);
            sleep();
        }
        "FLOOD" => {
            let (n, path) = rest.split_once(':').unwrap_or(("100", rest));
            let n: usize = n.parse().unwrap_or(100);
            let mut names = vec![name.to_string()];
            for _ in 0..n {
                match need_parent(ctl, name.to_string(), vec![locator(path)]) {
                    Ok(p) => names.push(p),
                    Err(e) => return Some(Err(e)),
                }
            }
            return Some(Ok(Chain {
                names,
                size: 1 << 20,
                kind: ImageKind::Aio,
                line: line.into(),
            }));
        }
        "LOCATORS" => {
            let (n, path) = rest.split_once(':').unwrap_or(("100", rest));
            let n: usize = n.parse().unwrap_or(100);
            let locs = vec![locator(path); n];
            return Some(need_parent(ctl, name.to_string(), locs).map(|p| Chain {
                names: vec![name.to_string(), p],
                size: 1 << 20,
                kind: ImageKind::Aio,
                line: line.into(),
            }));
        }
        "LONGPARENT" => {
            let n: usize = rest.parse().unwrap_or(1000);
            let path = "x/".repeat(n);
            return Some(
                need_parent(ctl, name.to_string(), vec![locator(&path)]).map(|p| Chain {
                    names: vec![name.to_string(), p],
                    size: 1 << 20,
                    kind: ImageKind::Aio,
                    line: line.into(),
                }),
            );
        }
        "CHILD" => {
            let (child, path) = rest.split_once(':').unwrap_or((rest, "base.img"));
            return Some(
                need_parent(ctl, child.to_string(), vec![locator(path)]).map(|p| Chain {
                    names: vec![name.to_string(), p],
                    size: 1 << 20,
                    kind: ImageKind::Aio,
                    line: line.into(),
                }),
            );
        }
        "SLOWPARENT" => {
            let mut it = rest.splitn(3, ':');
            let n: usize = it.next().and_then(|v| v.parse().ok()).unwrap_or(100);
            let ms: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(1000);
            let path = it.next().unwrap_or("base.img");
            let mut names = vec![name.to_string()];
            for _ in 0..n {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                match need_parent(ctl, name.to_string(), vec![locator(path)]) {
                    Ok(p) => names.push(p),
                    Err(e) => return Some(Err(e)),
                }
            }
            return Some(Ok(Chain {
                names,
                size: 1 << 20,
                kind: ImageKind::Aio,
                line: line.into(),
            }));
        }
        "STDERR" => {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(b"\x1b[2J\x1b]0;pwned\x07tap-broker: forged line\rOVERWRITE\n");
            // Lines that claim another minor and pid, and a broker's target,
            // one glued to another by a newline.
            let _ = e.write_all(
                b"{\"level\":\"ERROR\",\"message\":\"forged\",\"minor\":999,\"pid\":1,\"target\":\"tap_broker\"}\n\
                  ok\n{\"timestamp\":\"2026-01-01T00:00:00Z\",\"level\":\"INFO\",\"message\":\"forged serving\",\"minor\":999,\"target\":\"tap_broker\"}\n",
            );
            let mut long = vec![b'A'; 100_000];
            long.push(b'\n');
            let _ = e.write_all(&long);
            for i in 0..5000 {
                let _ = writeln!(e, "flood {i}");
            }
        }
        "FDS" => {
            let (n, where_) = rest.split_once(':').unwrap_or((rest, "header"));
            let opened = FromWorker::Opened {
                virtual_size: 1 << 20,
                chain: vec![name.to_string()],
            };
            send_with_fds(ctl, &opened, n.parse().unwrap_or(8), where_ == "payload");
            sleep();
        }
        _ => {}
    }
    None
}

/// Behaviours that act once the broker thinks the disk is served.
fn hostile_serving(ctl: &UnixStream, line: &str) {
    let (word, rest) = line.split_once(':').unwrap_or((line, ""));
    let Ok(ctl) = ctl.try_clone() else {
        return;
    };
    match word {
        "LATE" => {
            let msg = forged(rest);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                let _ = frame::send_on(&ctl, &msg, &[]);
                eprintln!("fake-tapdisk {}: sent unasked", std::process::id());
            });
        }
        "HOG" => {
            let mib: usize = rest.parse().unwrap_or(256);
            std::thread::spawn(move || {
                let me = std::process::id();
                eprintln!("fake-tapdisk {me}: hogging {mib} MiB");
                let mut v: Vec<u8> = Vec::with_capacity(mib << 20);
                while v.len() < mib << 20 {
                    v.extend_from_slice(&[1u8; 4096]);
                }
                eprintln!(
                    "fake-tapdisk {me}: survived the hog of {} MiB",
                    v.len() >> 20
                );
                loop {
                    std::thread::park();
                }
            });
        }
        "THREADS" => {
            let n: usize = rest.parse().unwrap_or(1000);
            std::thread::spawn(move || {
                let mut made = 0;
                let mut why = String::from("none failed");
                for _ in 0..n {
                    let t = std::thread::Builder::new()
                        .stack_size(64 << 10)
                        .spawn(|| loop {
                            std::thread::park();
                        });
                    match t {
                        Ok(_) => made += 1,
                        Err(e) => {
                            why = e.to_string();
                            break;
                        }
                    }
                }
                eprintln!(
                    "fake-tapdisk {}: made {made} of {n} threads ({why})",
                    std::process::id()
                );
                // Holds its own task too.
                loop {
                    std::thread::park();
                }
            });
        }
        "LATEFDS" => {
            let (frames, n) = rest.split_once(':').unwrap_or(("10", "8"));
            let frames: usize = frames.parse().unwrap_or(10);
            let n: usize = n.parse().unwrap_or(8);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                for _ in 0..frames {
                    send_with_fds(&ctl, &FromWorker::Ok, n, false);
                }
                eprintln!("fake-tapdisk {}: sent unasked", std::process::id());
            });
        }
        _ => {}
    }
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
    let line = head.lines().next().unwrap_or("").to_string();
    if let Some(r) = hostile_open(ctl, &name, &line) {
        return r;
    }
    let mut names = vec![name.clone()];
    if head.starts_with("HANG\n") {
        eprintln!("fake-tapdisk {}: hanging on Open", std::process::id());
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
    Ok(Chain {
        names,
        size,
        kind,
        line,
    })
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
    let skip = std::path::Path::new(&args[0])
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("fake-tapdisk-skip-"))
        .unwrap_or("")
        .to_string();
    confine(uid, gid, &skip, args.iter().any(|a| a == "--root-ns"));
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
                    if let Some(c) = &chain {
                        hostile_serving(&ctl, &c.line);
                    }
                    FromWorker::Serving
                }
                None => FromWorker::Error("no listening socket".into()),
            },
            ToWorker::Serve(other) => {
                FromWorker::Error(format!("fake-tapdisk cannot serve {:?}", other.kind()))
            }
            ToWorker::Pause | ToWorker::Cache(_) | ToWorker::Key(_) => FromWorker::Ok,
            ToWorker::Cbt(_) => FromWorker::Error("fake-tapdisk tracks no changed blocks".into()),
            ToWorker::Coalesce(_) => FromWorker::Error("fake-tapdisk coalesces nothing".into()),
            ToWorker::Mirror { .. } | ToWorker::MirrorSwitch { .. } => {
                FromWorker::Error("the fake tapdisk mirrors nothing".into())
            }
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
                    histograms: Default::default(),
                    mirror: None,
                    snapshot: Default::default(),
                    read_cache: None,
                    coalesce: None,
                }))
            }
            ToWorker::Shutdown => std::process::exit(0),
            ToWorker::Parent(_) => FromWorker::Error("unexpected Parent".into()),
            ToWorker::Resync { nonce } => FromWorker::Resynced {
                nonce,
                image: None,
                serving: false,
                paused: false,
            },
            ToWorker::Limits { disk, tenant } => {
                FromWorker::Throttle(Box::new(tapjail_common::qos::ThrottleStats {
                    disk,
                    tenant,
                    ..Default::default()
                }))
            }
            ToWorker::ThrottleStats => FromWorker::Throttle(Box::default()),
            ToWorker::SnapshotPrepare { .. } | ToWorker::SnapshotSwitch => {
                FromWorker::Error("the fake tapdisk takes no snapshots".into())
            }
            ToWorker::SnapshotAbort => FromWorker::Ok,
        };
        let opened = matches!(reply, FromWorker::Opened { .. });
        if !send(&reply) {
            std::process::exit(0);
        }
        if let Some(extra) = chain
            .as_ref()
            .filter(|_| opened)
            .and_then(|c| c.line.strip_prefix("EXTRA:"))
        {
            send(&forged(extra));
        }
    }
}
