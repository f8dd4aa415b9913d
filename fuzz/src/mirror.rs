//! A hostile NBD *server* against the worker's mirror client
//! (`tapjail_worker::mirror::client`): the input is everything the
//! secondary says. The client negotiates on it (greeting, option replies
//! of any type and length), then, if it got an export, writes, reads and
//! flushes against the rest. Invariants beyond "no panic, no unbounded
//! allocation": a negotiated export is writable and no larger than
//! `MAX_EXPORT_SIZE`; a read the server answered fills exactly the buffer.

use std::io::{self, Cursor, Read, Write};
use tapjail_worker::mirror::client::{NbdClient, MAX_EXPORT_SIZE, TFLAG_READ_ONLY};

/// The server's bytes in, the client's bytes counted and dropped.
struct Server<'a> {
    said: Cursor<&'a [u8]>,
    heard: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.said.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.heard += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How far one input got: `None` when negotiation failed, else how many
/// of the write, read and flush the server acknowledged.
pub fn mirror_server(data: &[u8]) -> Option<usize> {
    let s = Server {
        said: Cursor::new(data),
        heard: 0,
    };
    let mut c = NbdClient::handshake(s, "").ok()?;
    assert!(c.export.size <= MAX_EXPORT_SIZE);
    assert_eq!(c.export.flags & TFLAG_READ_ONLY, 0, "a read-only export was accepted");
    let len = 4096usize.min(usize::try_from(c.export.size).unwrap_or(4096));
    let mut ok = 0;
    if len > 0 {
        if c.write_at(&vec![0xA5; len], 0).is_ok() {
            ok += 1;
        }
        let mut buf = vec![0u8; len];
        if c.read_at(&mut buf, 0).is_ok() {
            assert_eq!(buf.len(), len);
            ok += 1;
        }
    }
    if c.flush().is_ok() {
        ok += 1;
    }
    Some(ok)
}

/// Well-formed server sessions: fixed newstyle with `NBD_OPT_GO` (an
/// unknown info first), and the `NBD_OPT_EXPORT_NAME` fallback, each
/// followed by replies to a write, a read and a flush.
pub fn seeds() -> Vec<Vec<u8>> {
    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = b"NBDMAGICIHAVEOPT".to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }
    fn opt(rtype: u32, data: &[u8], option: u32) -> Vec<u8> {
        let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&rtype.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }
    fn reply(handle: u64, data: &[u8]) -> Vec<u8> {
        let mut v = 0x6744_6698u32.to_be_bytes().to_vec();
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(data);
        v
    }
    let size: u64 = 1 << 20;
    let flags: u16 = 1 | (1 << 2); // HAS_FLAGS | SEND_FLUSH
    let io = |v: &mut Vec<u8>| {
        v.extend(reply(1, &[]));
        v.extend(reply(2, &[0x5a; 4096]));
        v.extend(reply(3, &[]));
    };
    let mut go = greeting(3);
    go.extend(opt(3, &[0, 9, 1, 2], 7));
    let mut info = 0u16.to_be_bytes().to_vec();
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    go.extend(opt(3, &info, 7));
    go.extend(opt(1, &[], 7));
    io(&mut go);
    let mut old = greeting(1);
    old.extend(opt(0x8000_0001, &[], 7));
    old.extend_from_slice(&size.to_be_bytes());
    old.extend_from_slice(&flags.to_be_bytes());
    old.extend_from_slice(&[0; 124]);
    io(&mut old);
    vec![go, old]
}
