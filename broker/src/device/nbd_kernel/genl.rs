//! Generic netlink, just enough to drive the kernel nbd driver: resolve the
//! `nbd` family, send one command, read its answer and acknowledgement.
//!
//! Hand-rolled rather than a crate: four commands with a handful of
//! attributes each. Messages are built by [`Msg`] and parsed by
//! [`messages`] / [`attrs`], pure functions that check every length
//! against the bytes actually there (a kernel answer is trusted, but a
//! wrong length must not become an out-of-bounds slice or a panic).

use rustix::net::{RecvFlags, SendFlags};
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// Largest answer we read (the kernel's STATUS of every nbd device is a
/// few bytes each; 64 KiB is thousands of devices).
const RECV_BUFFER: usize = 64 << 10;
/// A kernel answer is immediate; this only guards against a bug.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);

/// The message when the driver is missing, naming what to load.
pub const NOT_LOADED: &str = "kernel nbd driver not loaded: the generic netlink family \"nbd\" \
     is not registered (CONFIG_BLK_DEV_NBD; load it with `modprobe nbd`)";

/// Netlink failures, named by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    #[error("{NOT_LOADED}")]
    NotLoaded,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: the kernel refused: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: malformed netlink answer: {why}")]
    Malformed { what: String, why: &'static str },
}

impl GenlError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            GenlError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// One generic netlink request being built.
#[derive(Debug)]
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Msg {
    /// A request to `family` for `cmd`, asking for an acknowledgement.
    pub fn new(family: u16, cmd: u8, version: u8, seq: u32) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).expect("attribute under 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    pub fn put_u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.put(ty, &b)
    }

    /// Open a nested attribute; close it with [`Msg::end_nest`].
    pub fn nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest after nest");
        let len = u16::try_from(self.buf.len() - start).expect("nest under 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message bytes.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let len = u32::try_from(self.buf.len()).expect("message under 4 GiB");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One netlink message out of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    /// `NLMSG_ERROR` with error 0: the request is done.
    Ack {
        seq: u32,
    },
    /// `NLMSG_ERROR` with a negative errno.
    Error {
        seq: u32,
        errno: i32,
    },
    /// A generic netlink message: its command and its attributes' bytes.
    Genl {
        seq: u32,
        ty: u16,
        cmd: u8,
        attrs: &'a [u8],
    },
    Done {
        seq: u32,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages in one received datagram, in order.
pub fn messages(mut b: &[u8]) -> Result<Vec<Answer<'_>>, &'static str> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32_at(b, 0).ok_or("truncated message header")? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err("message length outside the datagram");
        }
        let ty = u16_at(b, 4).ok_or("truncated message header")?;
        let seq = u32_at(b, 8).ok_or("truncated message header")?;
        let body = &b[NLMSG_HDRLEN..len];
        out.push(match ty {
            NLMSG_ERROR => {
                let e = u32_at(body, 0).ok_or("truncated error message")? as i32;
                if e == 0 {
                    Answer::Ack { seq }
                } else {
                    Answer::Error {
                        seq,
                        errno: e.checked_neg().ok_or("absurd errno")?,
                    }
                }
            }
            NLMSG_DONE => Answer::Done { seq },
            _ => {
                if body.len() < GENL_HDRLEN {
                    return Err("truncated generic netlink header");
                }
                Answer::Genl {
                    seq,
                    ty,
                    cmd: body[0],
                    attrs: &body[GENL_HDRLEN..],
                }
            }
        });
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The attributes in `b`: `(type without flags, payload)`.
pub fn attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, &'static str> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = usize::from(u16_at(b, 0).ok_or("truncated attribute")?);
        if len < NLA_HDRLEN || len > b.len() {
            return Err("attribute length outside its container");
        }
        let ty = u16_at(b, 2).ok_or("truncated attribute")? & NLA_TYPE_MASK;
        out.push((ty, &b[NLA_HDRLEN..len]));
        b = b.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The first attribute of type `ty` as a u32.
pub fn attr_u32(list: &[(u16, &[u8])], ty: u16) -> Option<u32> {
    list.iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| u32_at(p, 0))
}

/// The first attribute of type `ty` as a u16.
pub fn attr_u16(list: &[(u16, &[u8])], ty: u16) -> Option<u16> {
    list.iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| u16_at(p, 0))
}

/// A generic netlink socket bound to one family.
#[derive(Debug)]
pub struct Genl {
    fd: OwnedFd,
    family: u16,
    version: u8,
    seq: u32,
}

impl Genl {
    /// Open a socket and resolve `name`; a family the kernel does not know
    /// is [`GenlError::NotLoaded`].
    pub fn open(name: &str, version: u8) -> Result<Genl, GenlError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: rustix::io::Errno| GenlError::Io {
                what,
                source: e.into(),
            }
        };
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::NETLINK,
            rustix::net::SocketType::RAW,
            rustix::net::SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::GENERIC),
        )
        .map_err(io("opening a generic netlink socket"))?;
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )
        .map_err(io("setting the netlink receive timeout"))?;
        let mut g = Genl {
            fd,
            family: GENL_ID_CTRL,
            version: 1,
            seq: 0,
        };
        let mut m = g.msg(CTRL_CMD_GETFAMILY);
        m.put_str(CTRL_ATTR_FAMILY_NAME, name);
        let found = match g.call("resolving the nbd netlink family", m) {
            Ok(a) => a,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Err(GenlError::NotLoaded),
            Err(e) => return Err(e),
        };
        let list = attrs(&found).map_err(|why| GenlError::Malformed {
            what: "resolving the nbd netlink family".into(),
            why,
        })?;
        g.family = attr_u16(&list, CTRL_ATTR_FAMILY_ID).ok_or(GenlError::Malformed {
            what: "resolving the nbd netlink family".into(),
            why: "no family id in the answer",
        })?;
        g.version = version;
        Ok(g)
    }

    /// A fresh request for `cmd` of this family.
    pub fn msg(&mut self, cmd: u8) -> Msg {
        self.seq = self.seq.wrapping_add(1);
        Msg::new(self.family, cmd, self.version, self.seq)
    }

    /// Send `m` and wait for its acknowledgement; returns the attributes of
    /// the answer the kernel sent before it (empty if none).
    pub fn call(&mut self, what: &str, m: Msg) -> Result<Vec<u8>, GenlError> {
        let bytes = m.finish();
        let seq = u32_at(&bytes, 8).unwrap_or(0);
        let io = |source: io::Error| GenlError::Io {
            what: what.to_string(),
            source,
        };
        let sent =
            rustix::net::send(&self.fd, &bytes, SendFlags::empty()).map_err(|e| io(e.into()))?;
        if sent != bytes.len() {
            return Err(io(io::Error::other("short netlink send")));
        }
        let mut answer = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let (got, full) = match rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::TRUNC) {
                Ok((got, full)) => (got, full),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io(e.into())),
            };
            if full > got {
                return Err(GenlError::Malformed {
                    what: what.into(),
                    why: "answer larger than the receive buffer",
                });
            }
            let msgs = messages(&buf[..got]).map_err(|why| GenlError::Malformed {
                what: what.into(),
                why,
            })?;
            for m in msgs {
                match m {
                    Answer::Genl { seq: s, attrs, .. } if s == seq => {
                        answer = attrs.to_vec();
                    }
                    Answer::Ack { seq: s } if s == seq => return Ok(answer),
                    Answer::Error { seq: s, errno } if s == seq => {
                        return Err(GenlError::Kernel {
                            what: what.into(),
                            source: io::Error::from_raw_os_error(errno),
                        })
                    }
                    // Another request's leftovers (one timed out earlier).
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_matches_the_kernel_abi() {
        let mut m = Msg::new(0x1c, 1, 1, 7);
        m.put_u32(1, 5).put_u64(2, 1 << 30);
        m.nest(7).nest(1).put_u32(1, 9).end_nest().end_nest();
        m.put_str(10, "ab");
        let b = m.finish();
        assert_eq!(u32_at(&b, 0).unwrap() as usize, b.len());
        assert_eq!(u16_at(&b, 4), Some(0x1c));
        assert_eq!(u16_at(&b, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&b, 8), Some(7));
        assert_eq!(&b[16..20], &[1, 1, 0, 0]);
        let list = attrs(&b[20..]).unwrap();
        assert_eq!(list.len(), 4);
        assert_eq!(attr_u32(&list, 1), Some(5));
        assert_eq!(list[1], (2, &(1u64 << 30).to_ne_bytes()[..]));
        // Nested: SOCKETS { ITEM { FD = 9 } }, 4 + 4 + 8 bytes.
        assert_eq!(list[2].0, 7);
        let items = attrs(list[2].1).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(attr_u32(&attrs(items[0].1).unwrap(), 1), Some(9));
        // Strings are NUL-terminated and padded to 4 bytes.
        assert_eq!(list[3], (10, &b"ab\0"[..]));
        assert_eq!(b.len() % 4, 0);
    }

    fn nlmsg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b.resize(align4(b.len()), 0);
        b
    }

    #[test]
    fn answers_are_split_into_acks_errors_and_genl_messages() {
        let mut d = nlmsg(0x1c, 3, &[1, 1, 0, 0, 8, 0, 1, 0, 4, 0, 0, 0]);
        d.extend(nlmsg(NLMSG_ERROR, 3, &[0; 20]));
        d.extend(nlmsg(NLMSG_ERROR, 4, &(-libc::EBUSY).to_ne_bytes()));
        let m = messages(&d).unwrap();
        assert_eq!(m.len(), 3);
        match m[0] {
            Answer::Genl {
                seq: 3,
                ty: 0x1c,
                cmd: 1,
                attrs: a,
            } => assert_eq!(attr_u32(&attrs(a).unwrap(), 1), Some(4)),
            other => panic!("{other:?}"),
        }
        assert_eq!(m[1], Answer::Ack { seq: 3 });
        assert_eq!(
            m[2],
            Answer::Error {
                seq: 4,
                errno: libc::EBUSY
            }
        );
    }

    #[test]
    fn lengths_past_the_bytes_are_refused_not_sliced() {
        let mut d = nlmsg(0x1c, 1, &[1, 1, 0, 0]);
        d[0] = 200; // claims 200 bytes in a 20-byte datagram
        assert!(messages(&d).is_err());
        assert!(messages(&[1, 2, 3]).is_err());
        let mut d = nlmsg(0x1c, 1, &[1, 1]);
        d[0] = 18;
        assert!(messages(&d[..18]).is_err(), "no room for the genl header");
        // An attribute longer than its container, and one shorter than a header.
        assert!(attrs(&[40, 0, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(attrs(&[2, 0, 1, 0]).is_err());
        assert_eq!(attrs(&[]).unwrap().len(), 0);
        // A u32 attribute with a 1-byte payload reads as missing.
        let list = attrs(&[5, 0, 1, 0, 9, 0, 0, 0]).unwrap();
        assert_eq!(attr_u32(&list, 1), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..2000usize {
            let len = n % 97;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = messages(&b);
            let _ = attrs(&b);
        }
    }
}
