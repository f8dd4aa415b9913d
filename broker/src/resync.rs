//! Taking over a worker's control stream from a broker that died.
//!
//! The stream may hold anything the predecessor left: a reply it never
//! read, part of one it had started to read, a `NeedParent` it never
//! answered. Frames cannot be trusted to line up, so the new broker sends
//! `Resync` with a fresh random nonce and reads raw bytes until it finds
//! the frame `Resynced` with that nonce (a worker cannot have produced it
//! before seeing the nonce), discarding what came before. Bytes after it
//! would be an unsolicited message: refused. Bounded in bytes and time.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_common::worker_proto::{FromWorker, ToWorker};

/// Most stale bytes discarded before the answer (a few whole frames).
pub const MAX_DISCARD: usize = 4 * MAX_REQUEST_FRAME;

/// What the worker says it has (see [`FromWorker::Resynced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHas {
    pub image: Option<String>,
    pub serving: bool,
    pub paused: bool,
    /// Stale bytes that were discarded.
    pub discarded: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("sending Resync: {0}")]
    Send(frame::FrameError),
    #[error("reading the answer to Resync: {0}")]
    Io(#[from] io::Error),
    #[error("the control socket closed before the worker answered Resync")]
    Closed,
    #[error("no answer to Resync within {0:?}")]
    Timeout(Duration),
    #[error("more than {MAX_DISCARD} bytes before the answer to Resync")]
    TooMuch,
    #[error("malformed answer to Resync: {0}")]
    Malformed(String),
    #[error("sent {0} byte(s) after its answer to Resync (an unsolicited message)")]
    Trailing(usize),
}

/// A random nonce (from the kernel's CSPRNG).
pub fn nonce() -> io::Result<[u8; 16]> {
    let mut n = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The bytes that start a `Resynced` payload for `nonce`: the variant tag
/// and the nonce (postcard writes a `[u8; 16]` as 16 raw bytes).
fn marker(nonce: [u8; 16]) -> Vec<u8> {
    let full = postcard::to_allocvec(&FromWorker::Resynced {
        nonce,
        image: None,
        serving: false,
        paused: false,
    })
    .unwrap_or_default();
    // The three fields after the nonce encode as one byte each here.
    full[..full.len().saturating_sub(3)].to_vec()
}

/// Resynchronise `sock` with its worker within `limit`.
pub fn resync(sock: &UnixStream, limit: Duration) -> Result<WorkerHas, ResyncError> {
    let nonce = nonce()?;
    let by = Instant::now() + limit;
    frame::send_by(
        std::os::fd::AsFd::as_fd(sock),
        &ToWorker::Resync { nonce },
        &[],
        by,
    )
    .map_err(ResyncError::Send)?;
    let marker = marker(nonce);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut r = sock;
    loop {
        if let Some(has) = parse(&buf, &marker, nonce)? {
            return Ok(has);
        }
        if buf.len() > MAX_DISCARD + MAX_REQUEST_FRAME {
            return Err(ResyncError::TooMuch);
        }
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ResyncError::Timeout(limit));
        }
        sock.set_read_timeout(Some(left))?;
        match r.read(&mut chunk) {
            Ok(0) => return Err(ResyncError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ResyncError::Timeout(limit))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Find the answer in `buf`: `None` while it is not all there yet.
fn parse(buf: &[u8], marker: &[u8], nonce: [u8; 16]) -> Result<Option<WorkerHas>, ResyncError> {
    let Some(at) = buf
        .windows(marker.len())
        .enumerate()
        .skip(4)
        .find(|(_, w)| *w == marker)
        .map(|(i, _)| i)
    else {
        if buf.len() > MAX_DISCARD {
            return Err(ResyncError::TooMuch);
        }
        return Ok(None);
    };
    let mut len = [0u8; 4];
    len.copy_from_slice(&buf[at - 4..at]);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_REQUEST_FRAME || len < marker.len() {
        return Err(ResyncError::Malformed(format!("frame length {len}")));
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    let msg: FromWorker = postcard::from_bytes(&buf[at..at + len])
        .map_err(|e| ResyncError::Malformed(e.to_string()))?;
    let FromWorker::Resynced {
        nonce: got,
        image,
        serving,
        paused,
    } = msg
    else {
        return Err(ResyncError::Malformed("not Resynced".into()));
    };
    if got != nonce {
        return Err(ResyncError::Malformed("wrong nonce".into()));
    }
    if buf.len() > at + len {
        return Err(ResyncError::Trailing(buf.len() - at - len));
    }
    Ok(Some(WorkerHas {
        image: image.map(|i| crate::worker::clean(&i)),
        serving,
        paused,
        discarded: at - 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn answer(b: &UnixStream, image: Option<&str>) {
        let (m, _): (ToWorker, _) = frame::recv_on(b, 1 << 16).unwrap();
        let ToWorker::Resync { nonce } = m else {
            panic!("{m:?}")
        };
        frame::send_on(
            b,
            &FromWorker::Resynced {
                nonce,
                image: image.map(str::to_string),
                serving: true,
                paused: false,
            },
            &[],
        )
        .unwrap();
    }

    #[test]
    fn resync_discards_a_half_read_stale_reply_and_finds_the_answer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // What a dead broker left: the tail of a reply it had begun to
        // read (no header), then a whole stale reply.
        b.write_all(&[0x03, 0x41, 0x42]).unwrap();
        frame::send_on(&b, &FromWorker::Ok, &[]).unwrap();
        let t = std::thread::spawn(move || {
            answer(&b, Some("vhd:/srv/a.vhd"));
            b
        });
        let has = resync(&a, Duration::from_secs(5)).unwrap();
        assert_eq!(has.image.as_deref(), Some("vhd:/srv/a.vhd"));
        assert!(has.serving && !has.paused);
        assert_eq!(has.discarded, 3 + 5);
        // The stream is in step again: a normal exchange works.
        let b = t.join().unwrap();
        frame::send_on(&b, &FromWorker::Serving, &[]).unwrap();
        let (m, _): (FromWorker, _) = frame::recv_on(&a, 1 << 16).unwrap();
        assert_eq!(m, FromWorker::Serving);
    }

    #[test]
    fn resync_refuses_silence_a_wrong_nonce_and_trailing_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        assert!(matches!(
            resync(&a, Duration::from_millis(200)),
            Err(ResyncError::Timeout(_))
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(b);
        assert!(resync(&a, Duration::from_secs(1)).is_err());

        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let _: (ToWorker, _) = frame::recv_on(&b, 1 << 16).unwrap();
            let forged = FromWorker::Resynced {
                nonce: [7; 16],
                image: None,
                serving: false,
                paused: false,
            };
            frame::send_on(&b, &forged, &[]).unwrap();
            b
        });
        // A guessed nonce is never taken for the answer.
        assert!(matches!(
            resync(&a, Duration::from_millis(300)),
            Err(ResyncError::Timeout(_))
        ));
        drop(t.join().unwrap());

        // An answer followed by a message nobody asked for.
        let n = [9u8; 16];
        let mut bytes = Vec::new();
        for m in [
            FromWorker::Resynced {
                nonce: n,
                image: None,
                serving: false,
                paused: false,
            },
            FromWorker::Ok,
        ] {
            let p = postcard::to_allocvec(&m).unwrap();
            bytes.extend_from_slice(&(p.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&p);
        }
        assert!(matches!(
            parse(&bytes, &marker(n), n),
            Err(ResyncError::Trailing(5))
        ));
        assert!(parse(&bytes[..bytes.len() - 5], &marker(n), n)
            .unwrap()
            .is_some());
    }

    #[test]
    fn resync_gives_up_on_an_endless_stream() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let junk = vec![0x55u8; 64 * 1024];
            while b.write_all(&junk).is_ok() {}
        });
        assert!(matches!(
            resync(&a, Duration::from_secs(20)),
            Err(ResyncError::TooMuch)
        ));
        drop(a);
        t.join().unwrap();
    }
}
