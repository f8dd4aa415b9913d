//! A connected client socket: blocking reads, non-blocking or blocking
//! vectored sends, shutdown and timeouts, on a plain fd (the broker may
//! hand us a Unix or a TCP listener; both give stream sockets).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

#[derive(Debug)]
pub struct Sock {
    fd: OwnedFd,
}

impl Sock {
    pub fn new(fd: OwnedFd) -> Sock {
        Sock { fd }
    }

    /// Send as much of `bufs` as the socket takes; `nonblocking` returns
    /// `WouldBlock` instead of waiting for buffer space.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>], nonblocking: bool) -> io::Result<usize> {
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec (documented by std).
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len();
        let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: msg points at `bufs`, valid for the call.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Hang up (both directions). Wakes any thread blocked on the socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown takes integers; errors (already closed) are moot.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Receive and send timeouts (`None`: wait forever).
    pub fn set_timeouts(&self, recv: Option<Duration>, send: Option<Duration>) -> io::Result<()> {
        for (opt, d) in [(libc::SO_RCVTIMEO, recv), (libc::SO_SNDTIMEO, send)] {
            let d = d.unwrap_or(Duration::ZERO);
            let tv = libc::timeval {
                tv_sec: d.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_usec: d.subsec_micros().into(),
            };
            // SAFETY: tv is a valid timeval for the given length.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl io::Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl io::Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(buf)], false)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
