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
}

/// Send `msg` with `fds` attached.
pub fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
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
    let sent = sendmsg_fds(sock.as_raw_fd(), &frame, &raw)?;
    if sent < frame.len() {
        write_all(sock.as_raw_fd(), &frame[sent..])?;
    }
    Ok(())
}

/// Receive one frame of at most `max` payload bytes.
///
/// On any error the connection should be dropped: the stream position is
/// no longer known. Received fds are closed on error.
pub fn recv<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    max: usize,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER {
        let n = recvmsg_fds(sock.as_raw_fd(), &mut header[got..], &mut fds)?;
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
        let n = recvmsg_fds(sock.as_raw_fd(), &mut payload[got..], &mut fds)?;
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

fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
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

fn sendmsg_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
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
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn recvmsg_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, FrameError> {
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
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
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
        let sent = sendmsg_fds(a.as_raw_fd(), &payload, &[file.as_raw_fd()]).unwrap();
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
