//! A hostile NBD client against the real connection code. The input is
//! everything the client sends: its first part drives the fixed-newstyle
//! negotiation (options of any length, names, queries) in memory; if that
//! reaches transmission, the rest goes over a real socketpair into
//! `conn::serve`, which reads requests, skips refused payloads, runs
//! reads, writes, flushes, trims, zeroes and block-status queries on its
//! pool threads against an in-memory VHD, and sends simple or structured
//! replies.
//!
//! The harness parses the same stream beforehand the way the server must
//! (header, `decide`, payload) and numbers the requests, rewriting each
//! handle to its number. Invariants, beyond "no panic": the server's reply
//! stream parses; no reply answers a request never sent or one already
//! answered; block status covers at most what was asked (one extent with
//! REQ_ONE); and when the connection ends cleanly, every request got its
//! reply.

use crate::{MemFile, Shared};
use std::io::{self, Cursor, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use tapjail_image::vhd::{VhdImage, VhdLayer, VhdOptions};
use tapjail_image::Image;
use tapjail_worker::disk::Disk;
use tapjail_worker::frontend::nbd::conn::{self, End, ServerCtx};
use tapjail_worker::frontend::nbd::handshake::{negotiate, ExportInfo, Outcome};
use tapjail_worker::frontend::nbd::proto::*;
use tapjail_worker::frontend::nbd::sizing::Sizing;
use tapjail_worker::frontend::nbd::sock::Sock;

/// The served image: a 1 MiB dynamic VHD with 64 KiB blocks, partly
/// allocated (so block status sees data and holes).
const IMAGE: &[u8] = include_bytes!("../seeds/dyn.vhd");

/// Largest READ/WRITE payload advertised (small, so reads stay cheap).
pub const MAX_PAYLOAD_FUZZ: u32 = 256 * 1024;

/// How far one input got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NbdRun {
    /// Requests the server read and decided on (0: negotiation failed).
    pub requests: usize,
    /// Replies the client received.
    pub replies: usize,
    /// The connection ended cleanly (disconnect or end of input).
    pub clean: bool,
}

/// Reads the client's bytes, swallows the server's.
struct Client<'a>(Cursor<&'a [u8]>);

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the client expects back for request number `i`.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// A READ of this many bytes (a successful simple reply carries them).
    read: Option<u32>,
    /// A BLOCK_STATUS of this length, and whether REQ_ONE was set.
    status: Option<(u32, bool)>,
}

/// Walk the transmission stream as `conn::read_loop` does, numbering the
/// requests (handle = number). Returns the rewritten stream, what each
/// request expects and whether the server will end cleanly.
fn number_requests(stream: &[u8], session: &Session) -> (Vec<u8>, Vec<Sent>, bool) {
    let mut out = stream.to_vec();
    let mut sent = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(h) = stream.get(at..at + REQUEST_SIZE) else {
            // Nothing or part of a header left: end of input, clean.
            return (out, sent, true);
        };
        let h: &[u8; REQUEST_SIZE] = h.try_into().expect("sized");
        let Ok(req) = parse_request(h) else {
            return (out, sent, false);
        };
        let skip = match decide(&req, session) {
            Decision::HangUp(_) => return (out, sent, false),
            Decision::Disconnect => return (out, sent, true),
            Decision::Reject { skip, .. } => {
                sent.push(Sent {
                    read: None,
                    status: None,
                });
                // A short skip ends in EOF, which is clean.
                skip as usize
            }
            Decision::Run(cmd) => {
                let (read, status, payload) = match cmd {
                    Command::Read { len, .. } => (Some(len), None, 0),
                    Command::Write { len, .. } => (None, None, len as usize),
                    Command::BlockStatus { len, req_one, .. } => (None, Some((len, req_one)), 0),
                    _ => (None, None, 0),
                };
                if stream.len() < at + REQUEST_SIZE + payload {
                    // A write payload cut short: the server hangs up.
                    return (out, sent, false);
                }
                sent.push(Sent { read, status });
                payload
            }
        };
        let n = (sent.len() - 1) as u64;
        out[at + 8..at + 16].copy_from_slice(&n.to_be_bytes());
        at = at.saturating_add(REQUEST_SIZE).saturating_add(skip);
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Parse the server's replies, checking each against what was sent.
/// Returns how many requests were answered and whether the stream ended on
/// a reply boundary.
fn check_replies(mut r: &[u8], sent: &[Sent]) -> (usize, bool) {
    let mut done = vec![false; sent.len()];
    let mut answered = 0;
    let mut finish = |h: u64, done: &mut Vec<bool>| {
        let i = usize::try_from(h).expect("handle");
        assert!(i < sent.len(), "a reply to request {h}, never sent");
        assert!(!done[i], "request {h} answered twice");
        done[i] = true;
        answered += 1;
    };
    while r.len() >= 4 {
        match be32(r) {
            SIMPLE_REPLY_MAGIC => {
                if r.len() < 16 {
                    return (answered, false);
                }
                let (error, h) = (be32(&r[4..]), be64(&r[8..]));
                let i = usize::try_from(h).unwrap_or(usize::MAX);
                let data = match sent.get(i) {
                    Some(Sent { read: Some(n), .. }) if error == 0 => *n as usize,
                    _ => 0,
                };
                if r.len() < 16 + data {
                    return (answered, false);
                }
                finish(h, &mut done);
                r = &r[16 + data..];
            }
            STRUCTURED_REPLY_MAGIC => {
                if r.len() < 20 {
                    return (answered, false);
                }
                let flags = u16::from_be_bytes([r[4], r[5]]);
                let kind = u16::from_be_bytes([r[6], r[7]]);
                let h = be64(&r[8..]);
                let len = be32(&r[16..]) as usize;
                if r.len() < 20 + len {
                    return (answered, false);
                }
                let body = &r[20..20 + len];
                let i = usize::try_from(h).unwrap_or(usize::MAX);
                if kind == REPLY_TYPE_BLOCK_STATUS {
                    let Some(Sent {
                        status: Some((asked, one)),
                        ..
                    }) = sent.get(i).copied()
                    else {
                        panic!("block status for request {h}, which did not ask");
                    };
                    assert!(
                        len >= 12 && (len - 4).is_multiple_of(8),
                        "block status of {len} bytes"
                    );
                    let n = (len - 4) / 8;
                    assert!(!one || n == 1, "{n} extents despite REQ_ONE");
                    assert!(n <= MAX_EXTENTS, "{n} extents");
                    let total: u64 = (0..n).map(|k| u64::from(be32(&body[4 + 8 * k..]))).sum();
                    assert!(
                        total <= u64::from(asked),
                        "{total} bytes of status for {asked}"
                    );
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    finish(h, &mut done);
                }
                r = &r[20 + len..];
            }
            m => panic!("reply stream out of step: magic {m:#x}"),
        }
    }
    (answered, r.is_empty())
}

/// Run one hostile client (see the module doc).
pub fn nbd_client(data: &[u8]) -> NbdRun {
    let read_only = data.last().is_some_and(|b| b & 1 != 0);
    let file = Shared(Arc::new(MemFile::writable(IMAGE)));
    let layer = VhdLayer::open(Box::new(file), "fuzz", read_only, VhdOptions::default())
        .expect("the served image opens");
    let img: Arc<dyn Image> =
        Arc::new(VhdImage::from_layers(vec![layer]).expect("the served image opens"));
    let export = ExportInfo {
        name: "disk".into(),
        size: img.virtual_size(),
        read_only,
        description: "fuzz".into(),
        max_payload: MAX_PAYLOAD_FUZZ,
        bitmaps: Vec::new(),
    };
    let mut client = Client(Cursor::new(data));
    let Ok(Outcome::Transmission(session)) = negotiate(&mut client, &export) else {
        return NbdRun::default();
    };
    let at = (client.0.position() as usize).min(data.len());
    let (stream, sent, clean) = number_requests(&data[at..], &session);

    let sizing = Sizing {
        io_threads: 2,
        max_connections: 1,
        max_payload: MAX_PAYLOAD_FUZZ,
        inflight_bytes: 4 << 20,
        idle_bytes: 1 << 20,
    };
    let ctx = Arc::new(ServerCtx::new(Disk::new(img), sizing).expect("pool threads"));
    let (server, ours) = UnixStream::pair().expect("socketpair");
    let reader = ours.try_clone().expect("dup");
    let writer = Sock::new(OwnedFd::from(ours.try_clone().expect("dup")));
    // The client writes everything (MSG_NOSIGNAL: the server may hang up
    // first) and half-closes; another thread reads every reply.
    let tx = std::thread::spawn(move || {
        let _ = (&writer).write_all(&stream);
        let _ = ours.shutdown(Shutdown::Write);
    });
    let rx = std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = (&reader).read_to_end(&mut got);
        got
    });
    // On a thread of its own, as the worker serves each client; joined,
    // like the pool threads below, so that a fuzzer's leak check finds no
    // thread-local state of theirs still alive (the worker never stops
    // its pool).
    let serving = ctx.clone();
    let end = std::thread::spawn(move || {
        conn::serve(Arc::new(Sock::new(OwnedFd::from(server))), session, serving)
    })
    .join()
    .expect("serve")
    .expect("serve");
    ctx.pool.shutdown();
    // The throttle lanes' threads too (their thread-local state would be
    // reported as a leak otherwise).
    for lane in &ctx.paced {
        lane.shutdown();
    }
    tx.join().expect("client writer");
    let replies = rx.join().expect("client reader");
    let (answered, whole) = check_replies(&replies, &sent);
    let ended_clean = matches!(end, End::Clean);
    assert_eq!(
        ended_clean, clean,
        "server ended {end:?}, expected clean={clean}"
    );
    if ended_clean {
        assert!(whole, "the reply stream ends inside a reply");
        assert_eq!(answered, sent.len(), "requests left unanswered");
    }
    NbdRun {
        requests: sent.len(),
        replies: answered,
        clean: ended_clean,
    }
}

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn name_and(name: &str, rest: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(rest);
    d
}

fn req(flags: u16, kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&7u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Well-formed client sessions: every option we answer, then every
/// command (the last session only aborts).
pub fn seeds() -> Vec<Vec<u8>> {
    let query = {
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        q
    };
    let go = name_and("disk", &[0, 1, 0, 3]);
    let requests: Vec<u8> = [
        req(0, 0, 0, 4096),             // READ
        req(1, 1, 4096, 512),           // WRITE, FUA (refused when read-only)
        vec![0x5a; 512],                // its payload
        req(0, 3, 0, 0),                // FLUSH
        req(0, 4, 65536, 65536),        // TRIM
        req(2, 6, 0, 65536),            // WRITE_ZEROES, NO_HOLE
        req(8, 7, 0, u32::MAX),         // BLOCK_STATUS, REQ_ONE
        req(0, 7, 0, 1 << 20),          // BLOCK_STATUS, the whole disk
        req(0, 0, u64::MAX - 10, 4096), // READ past the end
        req(0, 99, 0, 0),               // unknown command
        req(0, 2, 0, 0),                // DISC
    ]
    .concat();
    let mut sessions = Vec::new();
    for flags in [3u32, 1] {
        let mut s = flags.to_be_bytes().to_vec();
        s.extend(opt(8, &[])); // STRUCTURED_REPLY
        s.extend(opt(9, &name_and("disk", &query))); // LIST_META_CONTEXT
        s.extend(opt(10, &name_and("disk", &query))); // SET_META_CONTEXT
        s.extend(opt(3, &[])); // LIST
        s.extend(opt(6, &go)); // INFO
        s.extend(opt(5, &[])); // STARTTLS: refused
        s.extend(opt(7, &go)); // GO
        s.extend_from_slice(&requests);
        s.push(flags as u8);
        sessions.push(s);
    }
    // Old-style EXPORT_NAME, then requests.
    let mut s = 1u32.to_be_bytes().to_vec();
    s.extend(opt(1, b"disk"));
    s.extend_from_slice(&requests);
    sessions.push(s);
    sessions.push(
        3u32.to_be_bytes()
            .iter()
            .copied()
            .chain(opt(2, &[]))
            .collect(),
    );
    sessions
}
