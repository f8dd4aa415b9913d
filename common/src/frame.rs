//! Length-prefixed postcard frames on a Unix stream socket, with fds passed
//! alongside by `SCM_RIGHTS`.
//!
//! A frame is a big-endian `u32` payload length followed by that many bytes
//! of postcard. The length is checked against the receiver's limit before
//! any payload is read into memory (as OpenSSH's monitor does), so a hostile
//! peer cannot make us allocate more than the limit. File descriptors ride
//! on the `sendmsg` that carries the header; the receiver takes them with
//! `MSG_CMSG_CLOEXEC` and refuses frames whose control data was truncated.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Largest frame the broker accepts from tap-ctl or a worker.
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;
/// Largest frame tap-ctl accepts from the broker (a `list` of every minor).
pub const MAX_REPLY_FRAME: usize = 8 * 1024 * 1024;
/// Most fds one frame may carry.
pub const MAX_FDS: usize = 8;

const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame carried more than {MAX_FDS} file descriptors or truncated control data")]
    TooManyFds,
    #[error("malformed frame: {0}")]
    Decode(postcard::Error),
    /// The payload held more than one message: not something our own
    /// peers ever send.
    #[error("malformed frame: {extra} byte(s) left over after the message")]
    Trailing { extra: usize },
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    /// A [`Deadline`] passed: the peer was silent too long, or sent part
    /// of a frame and then too little too slowly.
    #[error("{}", deadline_text(*.got, *.want))]
    Deadline { got: usize, want: Option<usize> },
}

fn deadline_text(got: usize, want: Option<usize>) -> String {
    match (got, want) {
        (0, _) => "no frame arrived before the deadline".into(),
        (got, Some(want)) => {
            format!("only {got} of {want} frame bytes arrived before the deadline")
        }
        (got, None) => format!("only {got} frame bytes arrived before the deadline"),
    }
}

/// When a frame must have arrived (or left), as absolute times.
///
/// Socket timeouts (`SO_RCVTIMEO`) apply to each read, so a peer that
/// trickles one byte just inside that timeout holds the other side for as
/// long as it likes. A `Deadline` bounds the whole frame instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadline {
    /// By when the first byte must arrive (`None`: no limit of its own).
    pub first_byte: Option<Instant>,
    /// How long the rest of the frame may take once its first byte came.
    pub whole_frame: Option<Duration>,
    /// A hard end for everything (an operation's deadline).
    pub end: Option<Instant>,
}

impl Deadline {
    /// Everything by `at`.
    pub fn at(at: Instant) -> Deadline {
        Deadline {
            first_byte: Some(at),
            whole_frame: None,
            end: Some(at),
        }
    }

    /// The earliest of `end` and, depending on whether the frame has
    /// started, `first_byte` or start + `whole_frame`.
    fn effective(&self, started: Option<Instant>) -> Option<Instant> {
        let phase = match started {
            None => self.first_byte,
            Some(t) => self.whole_frame.and_then(|w| t.checked_add(w)),
        };
        match (phase, self.end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Send `msg` with `fds` attached.
pub fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    send_inner(sock, msg, fds, None)
}

/// Receive one frame of at most `max` payload bytes.
///
/// On any error the connection should be dropped: the stream position is
/// no longer known. Received fds are closed on error.
pub fn recv<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    max: usize,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    recv_by(sock, max, Deadline::default())
}

/// [`recv`], but the frame must arrive within `deadline` (a whole-frame
/// bound, not a per-read one: see [`Deadline`]).
pub fn recv_by<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    max: usize,
    deadline: Deadline,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let fd = sock.as_raw_fd();
    let mut started: Option<Instant> = None;
    let mut read = |buf: &mut [u8], fds: &mut Vec<OwnedFd>, got: usize, want: Option<usize>| {
        let by = deadline.effective(started);
        let n = match by {
            None => recvmsg_fds(fd, buf, fds, 0)?,
            Some(by) => loop {
                if !wait_for(fd, libc::POLLIN, by)? {
                    return Err(FrameError::Deadline { got, want });
                }
                match recvmsg_fds(fd, buf, fds, libc::MSG_DONTWAIT) {
                    Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    r => break r?,
                }
            },
        };
        if started.is_none() && n > 0 {
            started = Some(Instant::now());
        }
        Ok::<usize, FrameError>(n)
    };
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER {
        let n = read(&mut header[got..], &mut fds, got, None)?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated { got, want: HEADER }
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // recvmsg, not recv: fds riding on payload bytes are taken (and
        // refused by the caller) rather than silently dropped by the kernel.
        let n = read(
            &mut payload[got..],
            &mut fds,
            got + HEADER,
            Some(len + HEADER),
        )?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: got + HEADER,
                want: len + HEADER,
            });
        }
        got += n;
    }
    let (msg, rest) = postcard::take_from_bytes(&payload).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing { extra: rest.len() });
    }
    Ok((msg, fds))
}

/// [`send`], but the whole frame must be taken by the peer before `by`:
/// a peer that reads its answer a byte at a time cannot hold us.
pub fn send_by<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
    by: Instant,
) -> Result<(), FrameError> {
    send_inner(sock, msg, fds, Some(by))
}

fn send_inner<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
    by: Option<Instant>,
) -> Result<(), FrameError> {
    if fds.len() > MAX_FDS {
        return Err(FrameError::TooManyFds);
    }
    let payload = postcard::to_allocvec(msg).map_err(FrameError::Encode)?;
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd = sock.as_raw_fd();
    let late = |sent: usize| FrameError::Deadline {
        got: sent,
        want: Some(frame.len()),
    };
    // The fds ride on the first sendmsg that moves any byte.
    let sent = loop {
        if let Some(by) = by {
            if !wait_for(fd, libc::POLLOUT, by)? {
                return Err(late(0));
            }
        }
        let flags = if by.is_some() { libc::MSG_DONTWAIT } else { 0 };
        match sendmsg_fds(fd, &frame, &raw, flags) {
            Err(e) if by.is_some() && e.kind() == io::ErrorKind::WouldBlock => {}
            r => break r?,
        }
    };
    write_all(fd, &frame, sent, by).map_err(|e| match e {
        WriteError::Late(n) => late(n),
        WriteError::Io(e) => FrameError::Io(e),
    })
}

enum WriteError {
    Io(io::Error),
    /// The deadline passed with this many bytes sent.
    Late(usize),
}

fn write_all(
    fd: RawFd,
    frame: &[u8],
    mut sent: usize,
    by: Option<Instant>,
) -> Result<(), WriteError> {
    while sent < frame.len() {
        if let Some(by) = by {
            match wait_for(fd, libc::POLLOUT, by) {
                Ok(true) => {}
                Ok(false) => return Err(WriteError::Late(sent)),
                Err(FrameError::Io(e)) => return Err(WriteError::Io(e)),
                Err(_) => return Err(WriteError::Late(sent)),
            }
        }
        let buf = &frame[sent..];
        let flags = libc::MSG_NOSIGNAL | if by.is_some() { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted
                || (by.is_some() && e.kind() == io::ErrorKind::WouldBlock)
            {
                continue;
            }
            return Err(WriteError::Io(e));
        }
        sent += n as usize;
    }
    Ok(())
}

/// Wait until `fd` is ready for `events` or `by` passes; `false` if it
/// passed. Errors and hang-ups count as ready (the read or write that
/// follows reports them).
fn wait_for(fd: RawFd, events: libc::c_short, by: Instant) -> Result<bool, FrameError> {
    loop {
        let now = Instant::now();
        if now >= by {
            return Ok(false);
        }
        // Round up, so that we never wake just before `by` and spin.
        let ms = (by - now).as_micros().div_ceil(1000);
        let ms = i32::try_from(ms).unwrap_or(i32::MAX);
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc > 0 {
            return Ok(true);
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Bytes of fd payload in an `SCM_RIGHTS` message; `nfds` ≤ [`MAX_FDS`].
fn fd_bytes(nfds: usize) -> u32 {
    debug_assert!(nfds <= MAX_FDS);
    // MAX_FDS * 4 fits u32 many times over.
    u32::try_from(nfds.min(MAX_FDS) * mem::size_of::<RawFd>()).unwrap_or(u32::MAX)
}

fn cmsg_space(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE(fd_bytes(nfds)) as usize }
}

fn sendmsg_fds(fd: RawFd, data: &[u8], fds: &[RawFd], flags: libc::c_int) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = vec![
        0u8;
        if fds.is_empty() {
            0
        } else {
            cmsg_space(fds.len())
        }
    ];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: control is large enough for one cmsg carrying fds.len() fds
        // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA
        // points at room for the fds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes(fds.len())) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points at live iov and control buffers.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn recvmsg_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> Result<usize, FrameError> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = vec![0u8; cmsg_space(MAX_FDS)];
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let n = loop {
        // SAFETY: msg points at live iov and control buffers.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    // Take ownership of every fd first so that they are closed on any error.
    // SAFETY: the kernel filled control with msg_controllen bytes of cmsgs;
    // the CMSG_* macros walk them within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        fds.clear();
        return Err(FrameError::TooManyFds);
    }
    Ok(n)
}

/// Convenience for callers holding anything that is an fd.
pub fn send_on<S: AsFd, T: Serialize>(
    sock: &S,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), FrameError> {
    send(sock.as_fd(), msg, fds)
}

/// Convenience for callers holding anything that is an fd.
pub fn recv_on_by<S: AsFd, T: DeserializeOwned>(
    sock: &S,
    max: usize,
    deadline: Deadline,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    recv_by(sock.as_fd(), max, deadline)
}

/// Convenience for callers holding anything that is an fd.
pub fn recv_on<S: AsFd, T: DeserializeOwned>(
    sock: &S,
    max: usize,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    recv(sock.as_fd(), max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Reply, Request};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn frame_round_trips_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_on(&a, &Request::Spawn, &[file.as_fd()]).unwrap();
        let (req, fds): (Request, _) = recv_on(&b, MAX_REQUEST_FRAME).unwrap();
        assert_eq!(req, Request::Spawn);
        assert_eq!(fds.len(), 1);
        send_on(&b, &Reply::Spawned { pid: 7 }, &[]).unwrap();
        let (rep, fds): (Reply, _) = recv_on(&a, MAX_REPLY_FRAME).unwrap();
        assert_eq!(rep, Reply::Spawned { pid: 7 });
        assert!(fds.is_empty());
    }

    #[test]
    fn fds_on_payload_bytes_are_taken_not_dropped() {
        let (a, b) = UnixStream::pair().unwrap();
        let payload = postcard::to_allocvec(&Request::Spawn).unwrap();
        (&a).write_all(&(payload.len() as u32).to_be_bytes())
            .unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let sent = sendmsg_fds(a.as_raw_fd(), &payload, &[file.as_raw_fd()], 0).unwrap();
        assert_eq!(sent, payload.len());
        let (req, fds): (Request, _) = recv_on(&b, MAX_REQUEST_FRAME).unwrap();
        assert_eq!(req, Request::Spawn);
        assert_eq!(fds.len(), 1, "the caller sees the fd and can refuse it");
    }

    #[test]
    fn oversized_frame_is_refused_before_reading() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&(u32::MAX).to_be_bytes()).unwrap();
        let err = recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&10u32.to_be_bytes()).unwrap();
        a.write_all(&[1, 2]).unwrap();
        drop(a);
        let err = recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0]).unwrap();
        drop(a);
        assert!(matches!(
            recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err(),
            FrameError::Truncated { .. }
        ));
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&3u32.to_be_bytes()).unwrap();
        a.write_all(&[0xff, 0xff, 0xff]).unwrap();
        let err = recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_after_the_message_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut payload = postcard::to_allocvec(&Request::Spawn).unwrap();
        payload.extend_from_slice(b"junk");
        a.write_all(&(payload.len() as u32).to_be_bytes()).unwrap();
        a.write_all(&payload).unwrap();
        let err = recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Trailing { extra: 4 }), "{err}");
    }

    #[test]
    fn closed_peer_is_reported_as_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(
            recv_on::<_, Request>(&b, MAX_REQUEST_FRAME).unwrap_err(),
            FrameError::Closed
        ));
    }

    #[test]
    fn trickled_frame_misses_its_whole_frame_deadline() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // A generous per-read timeout: each byte below arrives well within it.
        b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let trickler = std::thread::spawn(move || {
            a.write_all(&100u32.to_be_bytes()).unwrap();
            // One byte every 20 ms until the receiver gives up.
            while stop_rx.recv_timeout(Duration::from_millis(20)).is_err() {
                if a.write_all(&[0]).is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let dl = Deadline {
            first_byte: Some(t0 + Duration::from_secs(30)),
            whole_frame: Some(Duration::from_millis(300)),
            end: None,
        };
        let err = recv_on_by::<_, Request>(&b, MAX_REQUEST_FRAME, dl).unwrap_err();
        let took = t0.elapsed();
        stop_tx.send(()).unwrap();
        trickler.join().unwrap();
        match err {
            FrameError::Deadline { got, want } => {
                assert!(got > HEADER && got < 104, "{got}");
                assert_eq!(want, Some(104));
            }
            other => panic!("{other}"),
        }
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn silent_peer_misses_its_first_byte_deadline_and_end_caps_everything() {
        let (_a, b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let err = recv_on_by::<_, Request>(
            &b,
            MAX_REQUEST_FRAME,
            Deadline::at(t0 + Duration::from_millis(100)),
        )
        .unwrap_err();
        assert!(matches!(err, FrameError::Deadline { got: 0, .. }), "{err}");
        assert!(err.to_string().contains("no frame arrived"), "{err}");
        // `end` wins over a later whole-frame deadline.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0]).unwrap();
        let err = recv_on_by::<_, Request>(
            &b,
            MAX_REQUEST_FRAME,
            Deadline {
                first_byte: None,
                whole_frame: Some(Duration::from_secs(60)),
                end: Some(Instant::now() + Duration::from_millis(100)),
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, FrameError::Deadline { got: 2, want: None }),
            "{err}"
        );
    }

    #[test]
    fn frame_in_pieces_within_its_deadline_is_received() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let payload = postcard::to_allocvec(&Request::Spawn).unwrap();
            let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
            frame.extend(payload);
            for byte in frame {
                (&a).write_all(&[byte]).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            a
        });
        let dl = Deadline {
            first_byte: Some(Instant::now() + Duration::from_secs(10)),
            whole_frame: Some(Duration::from_secs(10)),
            end: None,
        };
        let (req, fds): (Request, _) = recv_on_by(&b, MAX_REQUEST_FRAME, dl).unwrap();
        assert_eq!(req, Request::Spawn);
        assert!(fds.is_empty());
        drop(writer.join().unwrap());
    }

    #[test]
    fn send_to_a_peer_that_does_not_read_misses_its_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        // Far more than a socket buffer holds.
        let big = vec![7u8; 8 << 20];
        let t0 = Instant::now();
        let err = send_by(a.as_fd(), &big, &[], t0 + Duration::from_millis(200)).unwrap_err();
        match err {
            FrameError::Deadline { got, want } => {
                assert!(got < want.unwrap(), "{got} {want:?}");
            }
            other => panic!("{other}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        // A small frame to a reading peer goes through.
        let (a, b) = UnixStream::pair().unwrap();
        send_by(
            a.as_fd(),
            &Request::Spawn,
            &[],
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        let (req, _): (Request, _) = recv_on(&b, MAX_REQUEST_FRAME).unwrap();
        assert_eq!(req, Request::Spawn);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&bytes).unwrap();
            drop(a);
            let _ = recv_on::<_, Request>(&b, MAX_REQUEST_FRAME);
        }
    }
}
