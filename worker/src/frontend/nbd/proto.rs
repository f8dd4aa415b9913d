//! The NBD wire format: constants, and pure parsers and encoders.
//!
//! Nothing here does I/O or touches the disk: every function takes bytes
//! (or plain values) and returns a value or a typed error, so the whole
//! protocol surface a hostile client can reach is testable and fuzzable in
//! isolation. Every length read from the wire is bounds-checked against the
//! bytes actually present and against the `MAX_*` limits below before use.
//!
//! Reference: the NBD protocol document (NetworkBlockDevice/nbd,
//! doc/proto.md), fixed-newstyle negotiation only.

// --- magics ---
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- handshake flags (server) and client flags ---
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- transmission flags ---
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// --- options ---
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// --- option replies ---
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// --- NBD_REP_INFO types ---
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- commands and their flags ---
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// --- structured replies ---
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// --- base:allocation ---
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` when a client selects it.
pub const META_BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// --- error values (the protocol's fixed set) ---
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// --- our limits ---
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option payload we read; bigger ones are refused (TOO_BIG) and skipped.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Largest option payload we skip over; beyond this we hang up.
pub const MAX_OPTION_SKIP: u32 = 1 << 20;
/// Most meta-context queries in one option.
pub const MAX_QUERIES: u32 = 128;
/// Most info requests in one OPT_INFO/OPT_GO.
pub const MAX_INFO_REQUESTS: u16 = 64;
/// Block size constraints we advertise (NBD_INFO_BLOCK_SIZE).
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ/WRITE payload we ever advertise (the protocol's customary
/// maximum); a server short of lockable memory advertises less
/// ([`Session::max_payload`]). A client that honours our block sizes never
/// exceeds it; one that sends a bigger WRITE is hung up on.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Most block-status descriptors in one reply.
pub const MAX_EXTENTS: usize = 128;

/// A malformed message: the caller decides between an error reply and
/// hanging up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} longer than {1} bytes")]
    TooLong(&'static str, usize),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("trailing bytes after {0}")]
    Trailing(&'static str),
}

/// A cursor over untrusted bytes: every read checks what is left.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32 length followed by that many bytes of UTF-8.
    fn string(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(ProtoError::TooLong(self.what, MAX_STRING));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtoError::NotUtf8(self.what))
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing(self.what))
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = be64(&b[..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        len: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    })
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub info: Vec<u16>,
}

pub fn parse_go(data: &[u8]) -> Result<GoRequest, ProtoError> {
    let mut c = Cursor {
        buf: data,
        what: "OPT_GO",
    };
    let name = c.string()?;
    let n = c.u16()?;
    if n > MAX_INFO_REQUESTS {
        return Err(ProtoError::TooLong(
            "OPT_GO info requests",
            MAX_INFO_REQUESTS.into(),
        ));
    }
    let info = (0..n).map(|_| c.u16()).collect::<Result<_, _>>()?;
    c.finish()?;
    Ok(GoRequest { name, info })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta(data: &[u8]) -> Result<MetaRequest, ProtoError> {
    let mut c = Cursor {
        buf: data,
        what: "meta context option",
    };
    let export = c.string()?;
    let n = c.u32()?;
    if n > MAX_QUERIES {
        return Err(ProtoError::TooLong(
            "meta context queries",
            MAX_QUERIES as usize,
        ));
    }
    let queries = (0..n).map(|_| c.string()).collect::<Result<_, _>>()?;
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// qemu's namespace for persistent dirty bitmaps.
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// Context id of the selected dirty bitmap (one may be selected).
pub const META_DIRTY_BITMAP_ID: u32 = 2;
/// A dirty bitmap descriptor's flag for written blocks (qemu's value).
pub const STATE_DIRTY: u32 = 1;

/// Whether a LIST query names the bitmap `name`: exactly, or by the
/// `qemu:` or `qemu:dirty-bitmap:` namespace.
pub fn query_matches_bitmap(query: &str, name: &str) -> bool {
    query == "qemu:"
        || query == META_DIRTY_BITMAP_PREFIX
        || query.strip_prefix(META_DIRTY_BITMAP_PREFIX) == Some(name)
}

/// Which of our contexts a meta-context query names. An empty query list
/// means "all"; `base:` names every context in that namespace.
pub fn query_matches_base_allocation(query: &str) -> bool {
    query == META_BASE_ALLOCATION || query == "base:"
}

/// A transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_SIZE: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// What was negotiated for a connection, as the request checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
    /// `qemu:dirty-bitmap:NAME` was selected: the bitmap's id
    /// (`crate::cbt::Bitmap::id`), looked up again for each request.
    pub dirty_bitmap: Option<u64>,
    /// Largest READ/WRITE payload accepted (what we advertised).
    pub max_payload: u32,
}

/// A request checked against the session, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload of `len` bytes follows the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_unmap: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// What to do with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Run(Command),
    /// Reply with this error; `skip` payload bytes follow and must be
    /// read and dropped first.
    Reject {
        error: u32,
        skip: u32,
    },
    /// The client asked to disconnect.
    Disconnect,
    /// The stream cannot be trusted any more: hang up.
    HangUp(&'static str),
}

/// Check a request against the session: flags, bounds, permissions.
/// Pure, so every path a hostile client can take is unit-testable.
pub fn decide(req: &Request, s: &Session) -> Decision {
    let payload = if req.kind == CMD_WRITE { req.length } else { 0 };
    let reject = |error| Decision::Reject {
        error,
        skip: payload,
    };
    if req.kind == CMD_WRITE && req.length > s.max_payload {
        // We will not buffer it, and skipping gigabytes is the client's DoS.
        return Decision::HangUp("write payload larger than the advertised maximum block size");
    }
    let allowed_flags = match req.kind {
        CMD_READ => CMD_FLAG_FUA | if s.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_DISC => CMD_FLAG_FUA,
        _ => return reject(NBD_EINVAL),
    };
    if req.flags & !allowed_flags != 0 {
        return reject(NBD_EINVAL);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.length);
    let in_bounds = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= s.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return reject(NBD_EPERM);
    }
    match req.kind {
        CMD_DISC => Decision::Disconnect,
        CMD_FLUSH => Decision::Run(Command::Flush),
        CMD_READ if len > s.max_payload => reject(NBD_EINVAL),
        CMD_READ | CMD_BLOCK_STATUS if !in_bounds => reject(NBD_EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_bounds => reject(NBD_ENOSPC),
        CMD_TRIM if !in_bounds => reject(NBD_EINVAL),
        CMD_READ => Decision::Run(Command::Read { offset, len }),
        CMD_WRITE => Decision::Run(Command::Write { offset, len, fua }),
        CMD_TRIM => Decision::Run(Command::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => Decision::Run(Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
        }),
        CMD_BLOCK_STATUS
            if !(s.structured && (s.base_allocation || s.dirty_bitmap.is_some())) || len == 0 =>
        {
            reject(NBD_EINVAL)
        }
        CMD_BLOCK_STATUS => Decision::Run(Command::BlockStatus {
            offset,
            len,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
        }),
        _ => reject(NBD_EINVAL),
    }
}

/// A human-readable reason for a rejected request, for error chunks.
pub fn reject_reason(error: u32) -> &'static str {
    match error {
        NBD_EPERM => "the export is read-only",
        NBD_ENOSPC => "request extends beyond the end of the export",
        _ => "invalid request (unknown command or flag, bad range, or block status without a context)",
    }
}

/// Map an errno from the disk to the protocol's fixed error set.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::EOPNOTSUPP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

// ---------------------------------------------------------------- encoders

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// One option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    // Our replies are built from bounded pieces (≤ MAX_STRING + a few bytes).
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_REP_SERVER` data for one export.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` data.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&tflags.to_be_bytes());
    d
}

pub fn info_block_size(max_payload: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&max_payload.to_be_bytes());
    d
}

pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    d
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless the
/// client asked for none.
pub fn export_name_reply(size: u64, tflags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Header (chunk header + offset) of a final `OFFSET_DATA` chunk carrying
/// `len` data bytes, which follow it on the wire.
pub fn offset_data_header(handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        len.saturating_add(8),
    ));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub fn error_chunk(handle: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut b = Vec::with_capacity(26 + msg.len());
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// The final `NONE` chunk (success without payload).
pub fn none_chunk(handle: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// A final `BLOCK_STATUS` chunk: `(length, flags)` descriptors.
pub fn block_status_chunk(handle: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    block_status_chunk_of(handle, context, extents, true)
}

/// A `BLOCK_STATUS` chunk, the last of the reply if `done` (one chunk per
/// selected meta context).
pub fn block_status_chunk_of(
    handle: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(20 + len);
    b.extend_from_slice(&chunk_header(
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    ));
    b.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    const RW: Session = Session {
        size: 1 << 20,
        read_only: false,
        structured: true,
        base_allocation: true,
        dirty_bitmap: None,
        max_payload: MAX_PAYLOAD,
    };

    fn request_bytes(r: &Request) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&r.flags.to_be_bytes());
        b[6..8].copy_from_slice(&r.kind.to_be_bytes());
        b[8..16].copy_from_slice(&r.handle.to_be_bytes());
        b[16..24].copy_from_slice(&r.offset.to_be_bytes());
        b[24..].copy_from_slice(&r.length.to_be_bytes());
        b
    }

    #[test]
    fn request_round_trips_through_the_parser() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(parse_request(&request_bytes(&r)).unwrap(), r);
        let mut bad = request_bytes(&r);
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn write_on_read_only_export_is_eperm_and_payload_is_skipped() {
        let ro = Session {
            read_only: true,
            ..RW
        };
        assert_eq!(
            decide(&req(CMD_WRITE, 0, 0, 512), &ro),
            Decision::Reject {
                error: NBD_EPERM,
                skip: 512
            }
        );
        for kind in [CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                decide(&req(kind, 0, 0, 512), &ro),
                Decision::Reject {
                    error: NBD_EPERM,
                    skip: 0
                }
            );
        }
        assert!(matches!(
            decide(&req(CMD_READ, 0, 0, 512), &ro),
            Decision::Run(_)
        ));
    }

    #[test]
    fn out_of_range_requests_are_rejected_without_overflow() {
        assert_eq!(
            decide(&req(CMD_READ, 0, u64::MAX, 2), &RW),
            Decision::Reject {
                error: NBD_EINVAL,
                skip: 0
            }
        );
        assert_eq!(
            decide(&req(CMD_WRITE, 0, (1 << 20) - 1, 2), &RW),
            Decision::Reject {
                error: NBD_ENOSPC,
                skip: 2
            }
        );
        assert!(matches!(
            decide(&req(CMD_READ, 0, (1 << 20) - 512, 512), &RW),
            Decision::Run(Command::Read { .. })
        ));
    }

    #[test]
    fn oversized_write_hangs_up_and_unknown_command_is_einval() {
        assert!(matches!(
            decide(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &RW),
            Decision::HangUp(_)
        ));
        assert_eq!(
            decide(&req(99, 0, 0, 0), &RW),
            Decision::Reject {
                error: NBD_EINVAL,
                skip: 0
            }
        );
        assert_eq!(
            decide(&req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512), &RW),
            Decision::Reject {
                error: NBD_EINVAL,
                skip: 0
            }
        );
    }

    #[test]
    fn block_status_needs_a_selected_context() {
        let plain = Session {
            base_allocation: false,
            ..RW
        };
        assert_eq!(
            decide(&req(CMD_BLOCK_STATUS, 0, 0, 512), &plain),
            Decision::Reject {
                error: NBD_EINVAL,
                skip: 0
            }
        );
        assert_eq!(
            decide(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &RW),
            Decision::Run(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true
            })
        );
    }

    #[test]
    fn go_and_meta_parse_and_reject_truncation_and_trailing_bytes() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_go(&d).unwrap(),
            GoRequest {
                name: "abc".into(),
                info: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        assert!(parse_go(&d[..d.len() - 1]).is_err());
        let mut t = d.clone();
        t.push(0);
        assert_eq!(parse_go(&t), Err(ProtoError::Trailing("OPT_GO")));
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta(&m).unwrap(),
            MetaRequest {
                export: String::new(),
                queries: vec!["base:allocation".into()]
            }
        );
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_meta(&huge), Err(ProtoError::TooLong(..))));
    }

    #[test]
    fn encoders_produce_the_documented_layouts() {
        assert_eq!(&server_greeting()[..8], b"NBDMAGIC");
        assert_eq!(&server_greeting()[8..16], b"IHAVEOPT");
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[16..20], &[0, 0, 0, 0]);
        let e = error_chunk(5, NBD_EIO, "boom");
        assert_eq!(e.len(), 20 + 6 + 4);
        assert_eq!(&e[16..20], &10u32.to_be_bytes());
        let h = offset_data_header(9, 4096, 512);
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        let bs = block_status_chunk(1, 1, &[(512, STATE_HOLE), (512, 0)]);
        assert_eq!(bs.len(), 20 + 4 + 16);
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_go(&bytes);
            let _ = parse_meta(&bytes);
            if bytes.len() >= 16 {
                let _ = parse_option_header(bytes[..16].try_into().unwrap());
            }
            if bytes.len() >= REQUEST_SIZE {
                if let Ok(r) = parse_request(bytes[..REQUEST_SIZE].try_into().unwrap()) {
                    let _ = decide(&r, &RW);
                }
            }
        }

        #[test]
        fn decided_commands_are_always_in_bounds(kind in 0u16..10, flags in any::<u16>(),
                                                  offset in any::<u64>(), length in any::<u32>()) {
            let r = req(kind, flags, offset, length);
            if let Decision::Run(cmd) = decide(&r, &RW) {
                let (o, l) = match cmd {
                    Command::Read { offset, len } | Command::Write { offset, len, .. }
                    | Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. }
                    | Command::BlockStatus { offset, len, .. } => (offset, len),
                    Command::Flush => (0, 0),
                };
                prop_assert!(o + u64::from(l) <= RW.size);
            }
        }
    }
}
