//! systemd's FD store: `sd_notify("FDSTORE=1\nFDNAME=…")` with the fd
//! attached keeps it in the service manager; the next start of the
//! service gets every stored fd as `LISTEN_FDS` (from fd 3) with
//! `LISTEN_FDNAMES`. Needs `FileDescriptorStoreMax=` in the unit (and
//! `FileDescriptorStorePreserve=yes` to survive `systemctl stop`).

use super::FdStoreError;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// First fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Most fds accepted from `LISTEN_FDS` (a sanity bound).
const MAX_LISTEN_FDS: usize = 60_000;

/// Where `sd_notify` messages go.
#[derive(Debug, Clone)]
pub struct SystemdStore {
    /// `NOTIFY_SOCKET` as given: a path, or `@name` for an abstract socket.
    socket: String,
}

impl SystemdStore {
    /// From `NOTIFY_SOCKET`, if systemd (or anything speaking its protocol)
    /// set it.
    pub fn from_env() -> Option<SystemdStore> {
        std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|socket| SystemdStore { socket })
    }

    pub fn new(socket: impl Into<String>) -> SystemdStore {
        SystemdStore {
            socket: socket.into(),
        }
    }

    fn err(&self, source: io::Error) -> FdStoreError {
        FdStoreError::Systemd {
            socket: self.socket.clone(),
            source,
        }
    }

    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), FdStoreError> {
        self.notify(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd])
    }

    pub fn remove(&self, name: &str) -> Result<(), FdStoreError> {
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])
    }

    /// One datagram to `NOTIFY_SOCKET`, with `fds` as SCM_RIGHTS.
    pub fn notify(&self, text: &str, fds: &[BorrowedFd<'_>]) -> Result<(), FdStoreError> {
        let (addr, len) = sockaddr(&self.socket).map_err(|e| self.err(e))?;
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| self.err(e.into()))?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut iov = libc::iovec {
            iov_base: text.as_ptr().cast_mut().cast(),
            iov_len: text.len(),
        };
        let space = if raw.is_empty() {
            0
        } else {
            // SAFETY: CMSG_SPACE is pure arithmetic.
            unsafe { libc::CMSG_SPACE((raw.len() * std::mem::size_of::<RawFd>()) as u32) as usize }
        };
        // u64 elements keep the buffer aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: a zeroed msghdr is a valid empty header; every pointer
        // set below points at live locals that outlive the sendmsg.
        let rc = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = std::ptr::addr_of!(addr).cast_mut().cast();
            msg.msg_namelen = len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !raw.is_empty() {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len =
                    libc::CMSG_LEN((raw.len() * std::mem::size_of::<RawFd>()) as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    raw.len(),
                );
            }
            libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if rc < 0 {
            return Err(self.err(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// `sockaddr_un` for a `NOTIFY_SOCKET` value (`@` = abstract namespace).
fn sockaddr(socket: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = socket.as_bytes();
    let (path, abstract_ns) = match bytes.first() {
        Some(b'@') => (&bytes[1..], true),
        Some(b'/') => (bytes, false),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor @abstract",
            ))
        }
    };
    let start = usize::from(abstract_ns);
    if start + path.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is too long",
        ));
    }
    for (i, b) in path.iter().enumerate() {
        addr.sun_path[start + i] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = base + start + path.len() + usize::from(!abstract_ns);
    Ok((addr, len as libc::socklen_t))
}

/// Parse `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` for process `me`:
/// the fd numbers and their names (`None` when they are not for us).
pub fn parse_listen(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Vec<(RawFd, String)>, FdStoreError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(Vec::new());
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| FdStoreError::Listen(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if n > MAX_LISTEN_FDS {
        return Err(FdStoreError::Listen(format!(
            "LISTEN_FDS={n} (more than {MAX_LISTEN_FDS})"
        )));
    }
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    if names.len() != n {
        return Err(FdStoreError::Listen(format!(
            "LISTEN_FDS={n} but LISTEN_FDNAMES has {} name(s); a stored fd without its name cannot be placed",
            names.len()
        )));
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (LISTEN_FDS_START + i as RawFd, name.to_string()))
        .collect())
}

/// The fds systemd passed to this process, by name, each made
/// close-on-exec; the variables are removed so nothing passes them on.
pub fn take_listen_fds() -> Result<Vec<(String, OwnedFd)>, FdStoreError> {
    let get = |k: &str| std::env::var(k).ok();
    let list = parse_listen(
        get("LISTEN_PID").as_deref(),
        get("LISTEN_FDS").as_deref(),
        get("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let mut out = Vec::with_capacity(list.len());
    for (fd, name) in list {
        // SAFETY: systemd passed fds LISTEN_FDS_START.. to us for our own
        // use and nothing else in this process has taken them (this runs
        // once, at startup).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| FdStoreError::Listen(format!("fd {fd} ({name}): {e}")))?;
        out.push((name, owned));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    /// Receive one notification as text and fds, the way systemd does.
    fn recv_notify(l: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut fds = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = vec![0u64; 64];
        // SAFETY: msghdr points at live buffers; the CMSG macros stay
        // within msg_controllen.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() * 8;
            let n = libc::recvmsg(l.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            assert!(n >= 0, "{}", io::Error::last_os_error());
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    let k = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..k {
                        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            n as usize
        };
        (String::from_utf8(buf[..n].to_vec()).unwrap(), fds)
    }

    #[test]
    fn fdstore_put_sends_the_fd_with_its_name_to_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let fake_systemd = UnixDatagram::bind(&path).unwrap();
        let store = SystemdStore::new(path.to_str().unwrap());
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        store.put("m3.fuse", w.as_fd()).unwrap();
        let (text, fds) = recv_notify(&fake_systemd);
        assert_eq!(text, "FDSTORE=1\nFDNAME=m3.fuse\n");
        assert_eq!(fds.len(), 1);
        // The stored fd is the very socket we put.
        let mut stored = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        stored.write_all(b"k").unwrap();
        let mut b = [0u8; 1];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"k");
        store.remove("m3.fuse").unwrap();
        let (text, fds) = recv_notify(&fake_systemd);
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=m3.fuse\n");
        assert!(fds.is_empty());
    }

    #[test]
    fn fdstore_reaches_an_abstract_notify_socket() {
        let name = format!("tapjail-test-notify-{}", std::process::id());
        let addr =
            <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
                name.as_bytes(),
            )
            .unwrap();
        let fake_systemd = UnixDatagram::bind_addr(&addr).unwrap();
        SystemdStore::new(format!("@{name}"))
            .notify("READY=1\n", &[])
            .unwrap();
        assert_eq!(recv_notify(&fake_systemd).0, "READY=1\n");
        assert!(SystemdStore::new("relative").notify("X=1\n", &[]).is_err());
    }

    #[test]
    fn listen_fds_are_parsed_only_for_this_process_and_need_every_name() {
        assert_eq!(
            parse_listen(Some("7"), Some("2"), Some("w1.ctl:m0.loop"), 7).unwrap(),
            vec![(3, "w1.ctl".to_string()), (4, "m0.loop".to_string())]
        );
        assert!(parse_listen(Some("8"), Some("2"), Some("a:b"), 7)
            .unwrap()
            .is_empty());
        assert!(parse_listen(None, None, None, 7).unwrap().is_empty());
        let e = parse_listen(Some("7"), Some("2"), Some("a"), 7).unwrap_err();
        assert!(e.to_string().contains("1 name(s)"), "{e}");
        assert!(parse_listen(Some("7"), Some("x"), Some("a"), 7).is_err());
    }
}
