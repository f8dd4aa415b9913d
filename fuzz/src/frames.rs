//! Control frames, decoded the way their real receivers decode them: the
//! input's first byte picks the channel (tap-ctl → broker `Request`,
//! broker → tap-ctl `Reply`, broker → worker `ToWorker`, worker → broker
//! `FromWorker`), the rest is what the peer wrote on the stream. The bytes
//! go through a real socketpair into `frame::recv_on` with the receiver's
//! own size limit, frame after frame until the stream fails.
//!
//! Invariants, beyond "no panic": a decoded message carries no fds (none
//! were sent); it re-encodes no longer than it came (postcard's canonical
//! form is the shortest); and the re-encoding, sent with `frame::send_on`,
//! decodes to the same value (round trip).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::io::Write;
use std::os::unix::net::UnixStream;
use tapjail_common::frame::{self, MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use tapjail_common::proto::{Reply, Request};
use tapjail_common::worker_proto::{FromWorker, ToWorker};

/// Which peer's messages the input holds, and what limit its receiver
/// sets (see each receiver's `recv_on` call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// tap-ctl → broker (`broker/src/server.rs`).
    Request,
    /// broker → tap-ctl (`ctl/src/client.rs`).
    Reply,
    /// broker → worker (`worker/src/control.rs`).
    ToWorker,
    /// worker → broker (`broker/src/worker`).
    FromWorker,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Request,
        Channel::Reply,
        Channel::ToWorker,
        Channel::FromWorker,
    ];

    /// The input's first byte picks the channel.
    pub fn tag(self) -> u8 {
        match self {
            Channel::Request => 0,
            Channel::Reply => 1,
            Channel::ToWorker => 2,
            Channel::FromWorker => 3,
        }
    }

    fn from_tag(b: u8) -> Channel {
        Channel::ALL[usize::from(b % 4)]
    }

    pub fn max(self) -> usize {
        match self {
            Channel::Reply => MAX_REPLY_FRAME,
            _ => MAX_REQUEST_FRAME,
        }
    }
}

/// One frame of `payload` as a peer writes it (length header first).
pub fn frame_bytes(payload: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    f.extend_from_slice(payload);
    f
}

/// Feed `data` (channel tag, then stream bytes) to the receiver; returns
/// how many frames decoded (so the replay knows its seeds get past
/// parsing).
pub fn control_frames(data: &[u8]) -> usize {
    let Some((&tag, stream)) = data.split_first() else {
        return 0;
    };
    match Channel::from_tag(tag) {
        Channel::Request => receive::<Request>(stream, Channel::Request.max()),
        Channel::Reply => receive::<Reply>(stream, Channel::Reply.max()),
        Channel::ToWorker => receive::<ToWorker>(stream, Channel::ToWorker.max()),
        Channel::FromWorker => receive::<FromWorker>(stream, Channel::FromWorker.max()),
    }
}

fn receive<T>(stream: &[u8], max: usize) -> usize
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok((mut tx, rx)) = UnixStream::pair() else {
        return 0;
    };
    // What fits in the socket buffer without blocking; the rest is as if
    // the peer stopped there (a truncated frame).
    if tx.set_nonblocking(true).is_err() {
        return 0;
    }
    let mut sent = 0;
    while sent < stream.len() {
        match tx.write(&stream[sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    drop(tx);
    let mut decoded = 0;
    // Where the next frame's header starts in `stream`.
    let mut at = 0usize;
    while let Ok((msg, fds)) = frame::recv_on::<_, T>(&rx, max) {
        assert!(fds.is_empty(), "fds appeared from nowhere");
        let len = stream
            .get(at..at + 4)
            .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
            .expect("a decoded frame had a header");
        assert!(len <= max, "a {len}-byte frame passed the {max}-byte limit");
        at += 4 + len;
        round_trip(&msg, len, max);
        decoded += 1;
    }
    decoded
}

/// Re-encode `msg` (which came in `len` payload bytes) and decode it again,
/// through the real sender and receiver.
fn round_trip<T>(msg: &T, len: usize, max: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = postcard::to_allocvec(msg).expect("a decoded message encodes");
    assert!(
        bytes.len() <= len,
        "{msg:?} re-encodes to {} bytes, more than the {len} it came in",
        bytes.len()
    );
    let back: T = postcard::from_bytes(&bytes).expect("a re-encoded message decodes");
    assert_eq!(&back, msg, "postcard round trip changed the message");
    // The frame layer too (the re-encoding is at most `len` ≤ `max` bytes,
    // which the socket buffer holds, so sending cannot block).
    let (a, b) = UnixStream::pair().expect("socketpair");
    frame::send_on(&a, msg, &[]).expect("sending a re-encoded message");
    let (back, fds): (T, _) = frame::recv_on(&b, max).expect("receiving it");
    assert!(fds.is_empty());
    assert_eq!(&back, msg, "frame round trip changed the message");
}

fn encode<T: Serialize>(msgs: &[T]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| frame_bytes(&postcard::to_allocvec(m).expect("seed encodes")))
        .collect()
}

/// Well-formed inputs, with how many frames each holds: every message of
/// every channel alone, then each channel's messages in one stream.
pub fn seeds() -> Vec<(Vec<u8>, usize)> {
    use tapjail_common::proto::StatsReply;
    use tapjail_common::proto::{ErrorKind, FrontendKind, ImageKind, ImageSpec, ListEntry};
    use tapjail_common::state::State;
    use tapjail_common::stats::{ImageStats, WorkerStats};
    use tapjail_common::worker_proto::{FrontendSpec, ParentLocator};
    use tapjail_common::Minor;

    let minor = Minor::new(16383).expect("minor");
    let spec = |p: &str| ImageSpec {
        kind: ImageKind::Vhd,
        path: p.into(),
    };
    let requests = vec![
        Request::Hello { version: 1 },
        Request::Allocate { minor: Some(minor) },
        Request::Allocate { minor: None },
        Request::Free { minor },
        Request::Spawn,
        Request::Attach { pid: 4242, minor },
        Request::Detach { pid: None, minor },
        Request::Open {
            pid: Some(7),
            minor,
            image: spec("/srv/a.vhd"),
            read_only: true,
        },
        Request::Close {
            pid: None,
            minor,
            force: true,
        },
        Request::Create {
            image: ImageSpec {
                kind: ImageKind::Aio,
                path: "/srv/raw.img".into(),
            },
            read_only: false,
            minor: None,
        },
        Request::Destroy {
            pid: Some(1),
            minor,
        },
        Request::Pause { pid: None, minor },
        Request::Unpause {
            pid: None,
            minor,
            image: Some(spec("/srv/b.vhd")),
        },
        Request::List {
            pid: None,
            minor: Some(minor),
        },
        Request::Stats { pid: None, minor },
        Request::Major,
    ];
    let stats = WorkerStats {
        name: "vhd:/srv/a.vhd".into(),
        secs: [8, 16],
        images: vec![ImageStats {
            name: "/srv/a.vhd".into(),
            hits: [1, 2],
            fail: [0, 1],
            ..ImageStats::default()
        }],
        reqs_outstanding: 3,
        ..WorkerStats::default()
    };
    let replies = vec![
        Reply::Hello { version: 1 },
        Reply::Ok,
        Reply::Allocated {
            minor,
            device: minor.device_path(),
        },
        Reply::Spawned { pid: 99 },
        Reply::Created {
            minor,
            pid: 99,
            device: minor.device_path(),
        },
        Reply::List(vec![
            ListEntry {
                pid: Some(99),
                minor: Some(minor),
                state: Some(State(0x22)),
                image: Some(spec("/srv/a.vhd")),
                read_only: true,
                frontend: Some(FrontendKind::Nbd),
                device: Some(minor.device_path()),
                restarts: 2,
                mirror: Some(tapjail_common::mirror::MirrorRecord {
                    uri: "nbd:/run/m.sock".into(),
                    mode: tapjail_common::mirror::MirrorMode::Mirror,
                    lost: None,
                }),
            },
            ListEntry {
                pid: None,
                minor: None,
                state: None,
                image: None,
                read_only: false,
                frontend: None,
                device: None,
                restarts: 0,
                mirror: None,
            },
        ]),
        Reply::Stats(Box::new(StatsReply {
            minor,
            pid: 99,
            frontend: Some(FrontendKind::Ublk),
            restarts: 0,
            worker: stats.clone(),
            tenant: "alice".into(),
            cgroup: Some(tapjail_common::stats::CgroupStats {
                path: "/sys/fs/cgroup/tapjail/alice/3".into(),
                memory_current: Some(5 << 20),
                memory_peak: Some(9 << 20),
                memory_max: Some(128 << 20),
                pids_current: Some(14),
                pids_max: Some(64),
                oom_kills: Some(0),
            }),
            throttle: Some(Default::default()),
        })),
        Reply::Error {
            kind: ErrorKind::Unsupported,
            message: "-2 is not built".into(),
        },
        Reply::Major { major: 254 },
        Reply::Error {
            kind: ErrorKind::Denied,
            message: "refused".into(),
        },
    ];
    let to_worker = vec![
        ToWorker::Open {
            kind: ImageKind::Vhd,
            name: "/srv/a.vhd".into(),
            read_only: false,
        },
        ToWorker::Parent(Ok("/srv/base.vhd".into())),
        ToWorker::Parent(Err("outside every image root".into())),
        ToWorker::Serve(FrontendSpec::Nbd {
            export_name: "disk".into(),
        }),
        ToWorker::Serve(FrontendSpec::Fuse {
            file_name: "disk".into(),
            resend: true,
        }),
        ToWorker::Serve(FrontendSpec::Ublk {
            dev_id: 3,
            nr_queues: 2,
            queue_depth: 128,
            max_io_bytes: 1 << 20,
            recovering: false,
        }),
        ToWorker::Pause,
        ToWorker::Unpause {
            kind: ImageKind::Aio,
            name: "/srv/raw.img".into(),
            read_only: true,
        },
        ToWorker::Close,
        ToWorker::Stats,
        ToWorker::Shutdown,
        ToWorker::Resync { nonce: [0xa5; 16] },
        ToWorker::Limits {
            disk: Default::default(),
            tenant: Default::default(),
        },
        ToWorker::ThrottleStats,
    ];
    let from_worker = vec![
        FromWorker::Ready { pid: 1234 },
        FromWorker::NeedParent {
            child: "/srv/a.vhd".into(),
            locators: vec![
                ParentLocator {
                    code: "W2ku".into(),
                    path: "/srv/base.vhd".into(),
                    relative: false,
                },
                ParentLocator {
                    code: "W2ru".into(),
                    path: "./base.vhd".into(),
                    relative: true,
                },
            ],
            parent_uuid: [7; 16],
        },
        FromWorker::Opened {
            virtual_size: 1 << 40,
            chain: vec!["/srv/a.vhd".into(), "/srv/base.vhd".into()],
        },
        FromWorker::Serving,
        FromWorker::Ok,
        FromWorker::Stats(Box::new(stats)),
        FromWorker::Error("no space".into()),
        FromWorker::Resynced {
            nonce: [0x5a; 16],
            image: Some("vhd:/srv/a.vhd".into()),
            serving: true,
            paused: false,
        },
        FromWorker::Throttle(Box::default()),
    ];
    let mut out = Vec::new();
    fn add<T: Serialize>(out: &mut Vec<(Vec<u8>, usize)>, ch: Channel, msgs: &[T]) {
        for m in msgs {
            let mut d = vec![ch.tag()];
            d.extend(encode(std::slice::from_ref(m)));
            out.push((d, 1));
        }
        let mut d = vec![ch.tag()];
        d.extend(encode(msgs));
        out.push((d, msgs.len()));
    }
    add(&mut out, Channel::Request, &requests);
    add(&mut out, Channel::Reply, &replies);
    add(&mut out, Channel::ToWorker, &to_worker);
    add(&mut out, Channel::FromWorker, &from_worker);
    out
}
