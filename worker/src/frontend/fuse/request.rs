//! Parsing one FUSE request as read from `/dev/fuse`. Pure: no I/O, no
//! allocation, no panics on any input — `fuzz/` and the proptest below feed
//! it random bytes.
//!
//! The kernel is the only writer of these messages, but the worker treats
//! them like any other input: every length and offset is checked against
//! the message and against the limits negotiated at INIT before use.

use super::abi::{self, ReadNe};

/// Largest WRITE payload we negotiate (`max_write`) and so accept.
///
/// Every `read(2)` of the device needs a buffer of this size (the pool in
/// `buf`), and in a confined worker all of it is locked memory
/// (`mlockall`), often under a few MiB of RLIMIT_MEMLOCK headroom: 256 KiB
/// lets four such buffers fit where 1 MiB allowed one, and measured no
/// clear loss for 1 MiB I/O (loop's 1 MiB bios become four requests in
/// flight at once). It is a constant, not
/// sized from the limit, because a fresh worker on a recovered connection
/// must accept the `max_write` its predecessor negotiated.
pub const MAX_WRITE: usize = 256 << 10;
/// Largest READ we serve in one reply; the kernel never asks for more than
/// `max_pages` pages, which we set to the same size.
pub const MAX_READ: usize = MAX_WRITE;
/// Longest file name the kernel sends with LOOKUP (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// The fixed header of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` (flags2 only with `FUSE_INIT_EXT`).
    pub flags: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub offset: u64,
    pub size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallocateIn {
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
}

/// What the kernel asks for. Opcodes we do not implement keep their number
/// so the dispatcher can answer `ENOSYS` (or nothing, where no answer is
/// expected).
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Init(InitIn),
    Lookup {
        name: &'a [u8],
    },
    Getattr,
    Setattr(SetattrIn),
    /// `flags` are the open(2) flags.
    Open {
        flags: u32,
    },
    Opendir,
    Read(ReadIn),
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release,
    Releasedir,
    /// `datasync`: fdatasync rather than fsync; both flush the image.
    Fsync,
    Flush,
    Fallocate(FallocateIn),
    Destroy,
    /// FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY: the kernel expects
    /// no reply to these.
    NoReply,
    Other(u32),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Op<'a>,
}

/// Why a message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message of {got} bytes is shorter than the {need}-byte request header")]
    ShortHeader { got: usize, need: usize },
    #[error("header says {header} bytes but {got} were read")]
    LengthMismatch { header: u32, got: usize },
    #[error("{extlen}-unit extension area does not fit in a {len}-byte request")]
    BadExtensions { extlen: u16, len: u32 },
    /// The header parsed; the argument of opcode `opcode` did not.
    #[error("opcode {opcode}: {what}")]
    BadArgument {
        unique: u64,
        opcode: u32,
        what: &'static str,
    },
}

impl ParseError {
    /// The request id, when the header was readable (so the request can
    /// still be answered with an error).
    pub fn unique(&self) -> Option<u64> {
        match self {
            ParseError::BadArgument { unique, .. } => Some(*unique),
            _ => None,
        }
    }
}

/// Parse one complete message (exactly what one `read(2)` returned).
pub fn parse(msg: &[u8]) -> Result<Request<'_>, ParseError> {
    let short = || ParseError::ShortHeader {
        got: msg.len(),
        need: abi::IN_HEADER_LEN,
    };
    let len = msg.u32_at(0).ok_or_else(short)?;
    let opcode = msg.u32_at(4).ok_or_else(short)?;
    let unique = msg.u64_at(8).ok_or_else(short)?;
    let nodeid = msg.u64_at(16).ok_or_else(short)?;
    let extlen = msg.u16_at(36).ok_or_else(short)?;
    if msg.len() < abi::IN_HEADER_LEN {
        return Err(short());
    }
    if usize::try_from(len).ok() != Some(msg.len()) {
        return Err(ParseError::LengthMismatch {
            header: len,
            got: msg.len(),
        });
    }
    // Extensions (security context, supplementary groups) trail the
    // argument; we negotiate none, but a nonzero length must still fit.
    let ext_bytes = usize::from(extlen) * 8;
    let arg_end = msg
        .len()
        .checked_sub(ext_bytes)
        .filter(|&end| end >= abi::IN_HEADER_LEN)
        .ok_or(ParseError::BadExtensions { extlen, len })?;
    let arg = &msg[abi::IN_HEADER_LEN..arg_end];
    let header = InHeader {
        len,
        opcode,
        unique,
        nodeid,
    };
    let bad = |what: &'static str| ParseError::BadArgument {
        unique,
        opcode,
        what,
    };
    let op = match opcode {
        abi::INIT => {
            if arg.len() < abi::INIT_IN_MIN_LEN {
                return Err(bad("INIT argument too short"));
            }
            let low = u64::from(arg.u32_at(12).ok_or_else(|| bad("init flags"))?);
            let mut flags = low;
            if low & abi::FUSE_INIT_EXT != 0 {
                let high = arg
                    .u32_at(16)
                    .ok_or_else(|| bad("INIT_EXT without flags2"))?;
                flags |= u64::from(high) << 32;
            }
            Op::Init(InitIn {
                major: arg.u32_at(0).ok_or_else(|| bad("init major"))?,
                minor: arg.u32_at(4).ok_or_else(|| bad("init minor"))?,
                max_readahead: arg.u32_at(8).ok_or_else(|| bad("init readahead"))?,
                flags,
            })
        }
        abi::LOOKUP => {
            // A NUL-terminated name; anything after the NUL is ignored.
            let nul = arg
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| bad("LOOKUP name not NUL-terminated"))?;
            if nul > MAX_NAME {
                return Err(bad("LOOKUP name longer than NAME_MAX"));
            }
            Op::Lookup { name: &arg[..nul] }
        }
        abi::GETATTR => Op::Getattr,
        abi::SETATTR => {
            if arg.len() < abi::SETATTR_IN_LEN {
                return Err(bad("SETATTR argument too short"));
            }
            Op::Setattr(SetattrIn {
                valid: arg.u32_at(0).ok_or_else(|| bad("setattr valid"))?,
                size: arg.u64_at(16).ok_or_else(|| bad("setattr size"))?,
            })
        }
        abi::OPEN => {
            if arg.len() < abi::OPEN_IN_LEN {
                return Err(bad("OPEN argument too short"));
            }
            Op::Open {
                flags: arg.u32_at(0).ok_or_else(|| bad("open flags"))?,
            }
        }
        abi::OPENDIR => Op::Opendir,
        abi::READ => {
            if arg.len() < abi::READ_IN_LEN {
                return Err(bad("READ argument too short"));
            }
            let size = arg.u32_at(16).ok_or_else(|| bad("read size"))?;
            if usize::try_from(size).map_or(true, |s| s > MAX_READ) {
                return Err(bad("READ larger than max_read"));
            }
            Op::Read(ReadIn {
                offset: arg.u64_at(8).ok_or_else(|| bad("read offset"))?,
                size,
            })
        }
        abi::WRITE => {
            if arg.len() < abi::WRITE_IN_LEN {
                return Err(bad("WRITE argument too short"));
            }
            let size = arg.u32_at(16).ok_or_else(|| bad("write size"))?;
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| s <= MAX_WRITE)
                .ok_or_else(|| bad("WRITE larger than max_write"))?;
            let end = abi::WRITE_IN_LEN
                .checked_add(size)
                .ok_or_else(|| bad("write size overflows"))?;
            let data = arg
                .get(abi::WRITE_IN_LEN..end)
                .ok_or_else(|| bad("WRITE data shorter than its size"))?;
            Op::Write {
                offset: arg.u64_at(8).ok_or_else(|| bad("write offset"))?,
                data,
            }
        }
        abi::STATFS => Op::Statfs,
        abi::RELEASE => Op::Release,
        abi::RELEASEDIR => Op::Releasedir,
        abi::FSYNC | abi::FSYNCDIR => {
            if arg.len() < abi::FSYNC_IN_LEN {
                return Err(bad("FSYNC argument too short"));
            }
            Op::Fsync
        }
        abi::FLUSH => Op::Flush,
        abi::FALLOCATE => {
            if arg.len() < abi::FALLOCATE_IN_LEN {
                return Err(bad("FALLOCATE argument too short"));
            }
            Op::Fallocate(FallocateIn {
                offset: arg.u64_at(8).ok_or_else(|| bad("fallocate offset"))?,
                length: arg.u64_at(16).ok_or_else(|| bad("fallocate length"))?,
                mode: arg.u32_at(24).ok_or_else(|| bad("fallocate mode"))?,
            })
        }
        abi::DESTROY => Op::Destroy,
        abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT | abi::NOTIFY_REPLY => Op::NoReply,
        other => Op::Other(other),
    };
    Ok(Request { header, op })
}

/// Whether a request with this opcode expects a reply. Used when a message
/// fails to parse: we must not answer FORGET or INTERRUPT even then.
pub fn expects_reply(opcode: u32) -> bool {
    !matches!(
        opcode,
        abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT | abi::NOTIFY_REPLY
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a request the way the kernel lays it out.
    pub(crate) fn msg(opcode: u32, unique: u64, nodeid: u64, arg: &[u8]) -> Vec<u8> {
        let len = abi::IN_HEADER_LEN + arg.len();
        let mut m = vec![0u8; len];
        abi::Writer::new(&mut m[..abi::IN_HEADER_LEN])
            .u32(0, len as u32)
            .u32(4, opcode)
            .u64(8, unique)
            .u64(16, nodeid);
        m[abi::IN_HEADER_LEN..].copy_from_slice(arg);
        m
    }

    pub(crate) fn write_arg(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut a = vec![0u8; abi::WRITE_IN_LEN];
        abi::Writer::new(&mut a)
            .u64(8, offset)
            .u32(16, data.len() as u32);
        a.extend_from_slice(data);
        a
    }

    pub(crate) fn read_arg(offset: u64, size: u32) -> Vec<u8> {
        let mut a = vec![0u8; abi::READ_IN_LEN];
        abi::Writer::new(&mut a).u64(8, offset).u32(16, size);
        a
    }

    #[test]
    fn parse_write_borrows_exactly_its_data() {
        let m = msg(abi::WRITE, 7, 2, &write_arg(4096, b"hello"));
        let r = parse(&m).unwrap();
        assert_eq!(r.header.unique, 7);
        assert_eq!(
            r.op,
            Op::Write {
                offset: 4096,
                data: b"hello"
            }
        );
    }

    #[test]
    fn parse_write_shorter_than_its_size_is_rejected() {
        let mut arg = write_arg(0, b"hello");
        arg.truncate(arg.len() - 1);
        let m = msg(abi::WRITE, 9, 2, &arg);
        let err = parse(&m).unwrap_err();
        assert_eq!(err.unique(), Some(9));
    }

    #[test]
    fn parse_write_over_max_write_is_rejected() {
        let mut arg = write_arg(0, b"");
        abi::Writer::new(&mut arg[16..20]).u32(0, (MAX_WRITE + 1) as u32);
        assert!(parse(&msg(abi::WRITE, 1, 2, &arg)).is_err());
    }

    #[test]
    fn parse_read_over_max_read_is_rejected() {
        let arg = read_arg(0, (MAX_READ + 1) as u32);
        assert!(parse(&msg(abi::READ, 1, 2, &arg)).is_err());
        let arg = read_arg(512, 4096);
        assert_eq!(
            parse(&msg(abi::READ, 1, 2, &arg)).unwrap().op,
            Op::Read(ReadIn {
                offset: 512,
                size: 4096
            })
        );
    }

    #[test]
    fn parse_header_length_must_match_the_read() {
        let mut m = msg(abi::GETATTR, 1, 1, &[0u8; 16]);
        m.push(0);
        assert!(matches!(parse(&m), Err(ParseError::LengthMismatch { .. })));
        assert!(matches!(
            parse(&m[..20]),
            Err(ParseError::ShortHeader { .. })
        ));
    }

    #[test]
    fn parse_lookup_needs_a_terminated_bounded_name() {
        let m = msg(abi::LOOKUP, 1, 1, b"disk\0");
        assert_eq!(parse(&m).unwrap().op, Op::Lookup { name: b"disk" });
        assert!(parse(&msg(abi::LOOKUP, 1, 1, b"disk")).is_err());
        let mut long = vec![b'a'; MAX_NAME + 1];
        long.push(0);
        assert!(parse(&msg(abi::LOOKUP, 1, 1, &long)).is_err());
    }

    #[test]
    fn parse_init_reads_flags2_only_with_init_ext() {
        let mut arg = vec![0u8; 64];
        abi::Writer::new(&mut arg)
            .u32(0, 7)
            .u32(4, 41)
            .u32(8, 131072)
            .u32(12, (abi::FUSE_INIT_EXT | abi::FUSE_ASYNC_DIO) as u32)
            .u32(16, (abi::FUSE_HAS_RESEND >> 32) as u32);
        let Op::Init(i) = parse(&msg(abi::INIT, 1, 0, &arg)).unwrap().op else {
            panic!("not init")
        };
        assert_eq!(i.minor, 41);
        assert_ne!(i.flags & abi::FUSE_HAS_RESEND, 0);
        // INIT_EXT promises flags2; without it, the old 16-byte form is fine.
        assert!(parse(&msg(abi::INIT, 1, 0, &arg[..16])).is_err());
        let mut old = arg[..16].to_vec();
        abi::Writer::new(&mut old[12..16]).u32(0, abi::FUSE_ASYNC_DIO as u32);
        assert!(parse(&msg(abi::INIT, 1, 0, &old)).is_ok());
        assert!(parse(&msg(abi::INIT, 1, 0, &arg[..12])).is_err());
    }

    #[test]
    fn parse_extension_area_must_fit() {
        let mut m = msg(abi::GETATTR, 1, 1, &[0u8; 16]);
        abi::Writer::new(&mut m[36..38]).u16(0, 10);
        assert!(matches!(parse(&m), Err(ParseError::BadExtensions { .. })));
    }

    #[test]
    fn parse_unknown_opcode_is_other_and_forget_expects_no_reply() {
        let m = msg(9999, 1, 1, &[]);
        assert_eq!(parse(&m).unwrap().op, Op::Other(9999));
        assert_eq!(
            parse(&msg(abi::FORGET, 1, 2, &[0u8; 8])).unwrap().op,
            Op::NoReply
        );
        assert!(!expects_reply(abi::INTERRUPT));
        assert!(expects_reply(abi::READ));
    }

    proptest::proptest! {
        #[test]
        fn parse_random_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_random_args_with_valid_header_never_panics(
            opcode in 0u32..60,
            extlen in 0u16..4,
            arg in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let mut m = msg(opcode, 1, 2, &arg);
            abi::Writer::new(&mut m[36..38]).u16(0, extlen);
            let _ = parse(&m);
        }
    }
}
