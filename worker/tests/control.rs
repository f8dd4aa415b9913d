//! Broker mode end to end: this test plays the broker on the control
//! socket of a real, confined `tapdisk --broker --frontend nbd`.

mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;
use support::*;
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_common::proto::ImageKind;
use tapjail_common::worker_proto::{FromWorker, FrontendSpec, ToWorker};

struct Broker {
    child: std::process::Child,
    sock: UnixStream,
}

impl Broker {
    fn start() -> Broker {
        Broker::start_for("nbd")
    }

    fn start_for(frontend: &str) -> Broker {
        let (child, sock) = spawn_broker_mode(frontend, None);
        let b = Broker { child, sock };
        assert!(matches!(b.recv(), FromWorker::Ready { .. }));
        b
    }

    fn recv(&self) -> FromWorker {
        frame::recv_on::<_, FromWorker>(&self.sock, MAX_REQUEST_FRAME)
            .unwrap()
            .0
    }

    fn ask(&self, msg: ToWorker, fds: &[std::os::fd::BorrowedFd<'_>]) -> FromWorker {
        frame::send_on(&self.sock, &msg, fds).unwrap();
        self.recv()
    }

    fn open(&self, path: &std::path::Path, read_only: bool) -> FromWorker {
        let f: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .unwrap()
            .into();
        self.ask(
            ToWorker::Open {
                kind: ImageKind::Aio,
                name: path.display().to_string(),
                read_only,
            },
            &[f.as_fd()],
        )
    }

    fn stats(&self) -> tapjail_common::stats::WorkerStats {
        match self.ask(ToWorker::Stats, &[]) {
            FromWorker::Stats(s) => *s,
            other => panic!("expected Stats, got {other:?}"),
        }
    }
}

fn serve_nbd(b: &Broker, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("export.sock");
    let l = UnixListener::bind(&path).unwrap();
    let r = b.ask(
        ToWorker::Serve(FrontendSpec::Nbd {
            export_name: "disk0".into(),
        }),
        &[l.as_fd()],
    );
    assert_eq!(r, FromWorker::Serving);
    path
}

#[test]
fn broker_drives_open_serve_stats_pause_unpause_close_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.img", 1 << 20, 0);
    let b = Broker::start();
    match b.open(&img, false) {
        FromWorker::Opened {
            virtual_size,
            chain,
        } => {
            assert_eq!(virtual_size, 1 << 20);
            assert_eq!(chain, vec![img.display().to_string()]);
        }
        other => panic!("expected Opened, got {other:?}"),
    }
    // A second Open is refused; a frontend other than the one we were
    // confined for is refused.
    assert!(matches!(b.open(&img, false), FromWorker::Error(_)));
    let r = b.ask(
        ToWorker::Serve(FrontendSpec::Fuse {
            file_name: "disk".into(),
            resend: false,
        }),
        &[],
    );
    assert!(
        matches!(r, FromWorker::Error(ref e) if e.contains("confined for the nbd frontend")),
        "{r:?}"
    );
    let sock = serve_nbd(&b, dir.path());

    // I/O through the export moves the counters.
    let before = b.stats();
    assert_eq!(before.secs, [0, 0]);
    let mut c = Client::connect(&sock, true, false);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[0x42; 4096]);
    assert_eq!(c.read_reply(0).unwrap().error, 0);
    c.request(CMD_READ, 0, 2, 0, 8192, &[]);
    let r = c.read_reply(0).unwrap();
    assert_eq!(&r.data[..4096], &[0x42; 4096][..]);
    let s = b.stats();
    assert_eq!(s.name, format!("aio:{}", img.display()));
    assert_eq!(s.secs, [16, 8], "sectors read/written");
    assert_eq!(s.images.len(), 1);
    assert_eq!(s.images[0].hits, [16, 8]);
    assert_eq!(s.images[0].driver.name, "aio");
    assert_eq!(s.frontend.kind, "nbd");
    assert_eq!(s.frontend.reqs, [2, 2]);
    assert_eq!(s.reqs_outstanding, 0);

    // Pause: requests wait instead of failing.
    assert_eq!(b.ask(ToWorker::Pause, &[]), FromWorker::Ok);
    c.request(CMD_READ, 0, 3, 0, 512, &[]);
    // Held, not lost: wait until the worker counts it outstanding (the
    // event), then no reply may be waiting on the socket.
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while b.stats().reqs_outstanding != 1 {
        assert!(
            std::time::Instant::now() < limit,
            "the paused worker never took the request: {:?}",
            b.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut byte = [0u8; 1];
    c.s.set_nonblocking(true).unwrap();
    // A byte read here would be a reply (and fails the test anyway).
    let peek = std::io::Read::read(&mut c.s, &mut byte);
    c.s.set_nonblocking(false).unwrap();
    assert!(
        matches!(&peek, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no reply while paused: {peek:?}"
    );
    assert_eq!(b.stats().reqs_outstanding, 1, "still held");
    // Unpause refuses an image of another size...
    let small = raw_image(dir.path(), "small.img", 1 << 19, 0);
    let f: OwnedFd = std::fs::File::open(&small).unwrap().into();
    let r = b.ask(
        ToWorker::Unpause {
            kind: ImageKind::Aio,
            name: small.display().to_string(),
            read_only: true,
        },
        &[f.as_fd()],
    );
    assert!(
        matches!(r, FromWorker::Error(ref e) if e.contains("virtual size")),
        "{r:?}"
    );
    // ...and takes one of the same size.
    let f: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap()
        .into();
    let r = b.ask(
        ToWorker::Unpause {
            kind: ImageKind::Aio,
            name: img.display().to_string(),
            read_only: false,
        },
        &[f.as_fd()],
    );
    assert!(
        matches!(r, FromWorker::Opened { virtual_size, .. } if virtual_size == 1 << 20),
        "{r:?}"
    );
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = c.read_reply(0).unwrap();
    assert_eq!((r.handle, r.error), (3, 0), "the held request completes");

    // Close stops the frontend and flushes; Shutdown exits.
    assert_eq!(b.ask(ToWorker::Close, &[]), FromWorker::Ok);
    assert!(closed_by_server(&mut c.s));
    assert!(matches!(b.ask(ToWorker::Close, &[]), FromWorker::Error(_)));
    assert_eq!(b.ask(ToWorker::Shutdown, &[]), FromWorker::Ok);
    let mut child = b.child;
    assert!(child.wait().unwrap().success());
}

#[test]
fn fuse_and_ublk_serve_without_their_fd_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.img", 1 << 20, 0);
    for frontend in ["fuse", "ublk"] {
        let b = Broker::start_for(frontend);
        assert!(matches!(b.open(&img, true), FromWorker::Opened { .. }));
        let spec = if frontend == "fuse" {
            FrontendSpec::Fuse {
                file_name: "disk".into(),
                resend: false,
            }
        } else {
            FrontendSpec::Ublk {
                dev_id: 0,
                nr_queues: 1,
                queue_depth: 8,
                max_io_bytes: 1 << 20,
                recovering: false,
            }
        };
        let r = b.ask(ToWorker::Serve(spec), &[]);
        // Both are built: without its fd, Serve is refused.
        let expected = if frontend == "ublk" {
            "/dev/ublkcN"
        } else {
            "exactly one fd"
        };
        assert!(
            matches!(r, FromWorker::Error(ref e) if e.contains(expected)),
            "{r:?}"
        );
        assert_eq!(b.ask(ToWorker::Shutdown, &[]), FromWorker::Ok);
        let mut child = b.child;
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn worker_flushes_and_exits_when_the_broker_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "a.img", 1 << 20, 0);
    let b = Broker::start();
    assert!(matches!(b.open(&img, false), FromWorker::Opened { .. }));
    let sock = serve_nbd(&b, dir.path());
    let mut c = Client::connect(&sock, false, false);
    c.request(CMD_WRITE, 0, 1, 4096, 512, &[0x77; 512]);
    assert_eq!(c.read_reply(0).unwrap().error, 0);
    let Broker { mut child, sock } = b;
    drop(sock);
    assert!(child.wait().unwrap().success());
    assert!(closed_by_server(&mut c.s));
    assert_eq!(std::fs::read(&img).unwrap()[4096..4608], [0x77; 512]);
}

/// A broker that died mid-open left the worker waiting for a `Parent`; the
/// next broker's `Resync` ends that exchange (the open fails, nothing is
/// left half open), the stale answer is never sent, and `Resynced` tells
/// the truth. Then the same worker opens and serves normally, and a
/// `Resync` while serving reports the open image.
#[test]
fn resync_ends_an_orphaned_parent_request_and_reports_what_is_open() {
    use tapjail_ctl::files::{create_path, snapshot_path};
    use tapjail_worker::image::vhd::create::CreateKind;
    use tapjail_worker::image::vhd::DEFAULT_BLOCK_SIZE;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create_path(
        &base,
        1 << 20,
        &CreateKind::Dynamic {
            block_size: DEFAULT_BLOCK_SIZE,
        },
    )
    .unwrap();
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let b = Broker::start();
    let f: OwnedFd = std::fs::File::open(&child).unwrap().into();
    let need = b.ask(
        ToWorker::Open {
            kind: ImageKind::Vhd,
            name: child.display().to_string(),
            read_only: true,
        },
        &[f.as_fd()],
    );
    assert!(matches!(need, FromWorker::NeedParent { .. }), "{need:?}");
    // The "old broker" is gone; a new one resyncs instead of answering.
    let nonce = [0x5a; 16];
    let r = b.ask(ToWorker::Resync { nonce }, &[]);
    assert_eq!(
        r,
        FromWorker::Resynced {
            nonce,
            image: None,
            serving: false,
            paused: false
        }
    );
    // Nothing else was queued: the stream is in step.
    let img = raw_image(dir.path(), "a.img", 1 << 20, 0);
    assert!(matches!(b.open(&img, false), FromWorker::Opened { .. }));
    serve_nbd(&b, dir.path());
    let r = b.ask(ToWorker::Resync { nonce: [1; 16] }, &[]);
    assert_eq!(
        r,
        FromWorker::Resynced {
            nonce: [1; 16],
            image: Some(format!("aio:{}", img.display())),
            serving: true,
            paused: false
        }
    );
    assert_eq!(b.ask(ToWorker::Shutdown, &[]), FromWorker::Ok);
}

/// `Cache` (open -D) makes the next Open's files buffered, is refused
/// while an image is open, and `Close` returns the worker to its default.
#[test]
fn cache_plan_applies_to_the_next_open_only_and_not_while_open() {
    use tapjail_common::xapi::CachePlan;
    use tapjail_testsupport::{dir_supports_o_direct, holds_open_direct, require};
    let dir = tempfile::tempdir().unwrap();
    if !require(
        dir_supports_o_direct(dir.path()),
        "O_DIRECT on the temp directory's filesystem",
    ) {
        return;
    }
    let img = raw_image(dir.path(), "a.img", 1 << 20, 0);
    let b = Broker::start();
    let pid = b.child.id();
    let plan = CachePlan {
        leaf_buffered: true,
        ..CachePlan::default()
    };
    assert_eq!(b.ask(ToWorker::Cache(plan), &[]), FromWorker::Ok);
    assert!(matches!(b.open(&img, false), FromWorker::Opened { .. }));
    assert_eq!(holds_open_direct(pid, &img), Some(false), "-D: buffered");
    let r = b.ask(ToWorker::Cache(CachePlan::default()), &[]);
    assert!(
        matches!(&r, FromWorker::Error(e) if e.contains("before Open")),
        "{r:?}"
    );
    assert_eq!(b.ask(ToWorker::Close, &[]), FromWorker::Ok);
    assert!(matches!(b.open(&img, false), FromWorker::Opened { .. }));
    assert_eq!(holds_open_direct(pid, &img), Some(true), "default again");
    assert_eq!(b.ask(ToWorker::Shutdown, &[]), FromWorker::Ok);
}
