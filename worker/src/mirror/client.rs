//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO` with a fallback to
//! `NBD_OPT_EXPORT_NAME`, simple replies only) over a socket the broker
//! connected. Every byte from the server is untrusted: lengths are checked
//! against explicit limits before anything is read into memory, and a
//! reply must answer the one request outstanding.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const INFO_EXPORT: u16 = 0;

/// Transmission flags we look at.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// Longest option reply payload read (an INFO is 12 bytes, an error
/// message a sentence).
pub const MAX_OPT_REPLY: u32 = 64 * 1024;
/// Most option replies one `NBD_OPT_GO` may draw before its ACK.
pub const MAX_OPT_REPLIES: usize = 64;
/// Longest single request we send.
pub const MAX_REQUEST: usize = 32 * 1024 * 1024;
/// The largest export size accepted (what fits an `i64` offset).
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not an NBD server: {0}")]
    NotNbd(String),
    #[error("NBD server: {0}")]
    Protocol(String),
    #[error("NBD server refused {what}: error {code}")]
    Refused { what: &'static str, code: u32 },
    #[error("the NBD export is read-only")]
    ReadOnly,
}

/// The export the server offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

/// A connected, negotiated client.
#[derive(Debug)]
pub struct NbdClient<S> {
    sock: S,
    pub export: Export,
    next_handle: u64,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn read_n<S: Read, const N: usize>(s: &mut S) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Read and drop `n` bytes (in small pieces: `n` is bounded by the caller).
fn skip<S: Read>(s: &mut S, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 512];
    while n > 0 {
        let k = usize::try_from(n.min(512)).unwrap_or(512);
        s.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl<S: Read + Write> NbdClient<S> {
    /// Negotiate export `name` on a fresh connection.
    pub fn handshake(mut sock: S, name: &str) -> Result<Self, ClientError> {
        let hello: [u8; 18] = read_n(&mut sock)?;
        if be64(&hello[0..8]) != NBDMAGIC {
            return Err(ClientError::NotNbd("no NBDMAGIC greeting".into()));
        }
        if be64(&hello[8..16]) != IHAVEOPT {
            return Err(ClientError::NotNbd(
                "an oldstyle server (no IHAVEOPT): only newstyle servers are supported".into(),
            ));
        }
        let hflags = be16(&hello[16..18]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotNbd(
                "the server does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
        sock.write_all(&cflags.to_be_bytes())?;
        let export = match Self::opt_go(&mut sock, name)? {
            Some(e) => e,
            None => Self::opt_export_name(&mut sock, name, no_zeroes)?,
        };
        if export.size > MAX_EXPORT_SIZE {
            return Err(ClientError::Protocol(format!(
                "export size {} is beyond {MAX_EXPORT_SIZE}",
                export.size
            )));
        }
        if export.flags & TFLAG_READ_ONLY != 0 {
            return Err(ClientError::ReadOnly);
        }
        Ok(NbdClient {
            sock,
            export,
            next_handle: 1,
        })
    }

    fn send_opt(sock: &mut S, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("option too long".into()))?;
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        sock.write_all(&m)?;
        Ok(())
    }

    /// `NBD_OPT_GO`; `None` when the server does not know it.
    fn opt_go(sock: &mut S, name: &str) -> Result<Option<Export>, ClientError> {
        let n = u32::try_from(name.len())
            .ok()
            .filter(|n| *n <= 4096)
            .ok_or_else(|| ClientError::Protocol("export name too long".into()))?;
        let mut data = n.to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        Self::send_opt(sock, OPT_GO, &data)?;
        let mut export = None;
        for _ in 0..MAX_OPT_REPLIES {
            let h: [u8; 20] = read_n(sock)?;
            if be64(&h[0..8]) != OPT_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            if be32(&h[8..12]) != OPT_GO {
                return Err(ClientError::Protocol(
                    "option reply for another option".into(),
                ));
            }
            let rtype = be32(&h[12..16]);
            let len = be32(&h[16..20]);
            if len > MAX_OPT_REPLY {
                return Err(ClientError::Protocol(format!(
                    "option reply of {len} bytes (at most {MAX_OPT_REPLY})"
                )));
            }
            match rtype {
                REP_ACK => {
                    skip(sock, u64::from(len))?;
                    return export.map(Some).ok_or_else(|| {
                        ClientError::Protocol("NBD_OPT_GO acknowledged without export info".into())
                    });
                }
                REP_INFO if len >= 2 => {
                    let kind: [u8; 2] = read_n(sock)?;
                    if be16(&kind) == INFO_EXPORT {
                        if len != 12 {
                            return Err(ClientError::Protocol(format!(
                                "NBD_INFO_EXPORT of {len} bytes (12 expected)"
                            )));
                        }
                        let b: [u8; 10] = read_n(sock)?;
                        export = Some(Export {
                            size: be64(&b[0..8]),
                            flags: be16(&b[8..10]),
                        });
                    } else {
                        skip(sock, u64::from(len - 2))?;
                    }
                }
                REP_ERR_UNSUP => {
                    skip(sock, u64::from(len))?;
                    return Ok(None);
                }
                t if t & 0x8000_0000 != 0 => {
                    skip(sock, u64::from(len))?;
                    return Err(ClientError::Refused {
                        what: "NBD_OPT_GO",
                        code: t,
                    });
                }
                _ => skip(sock, u64::from(len))?,
            }
        }
        Err(ClientError::Protocol(format!(
            "more than {MAX_OPT_REPLIES} replies to NBD_OPT_GO"
        )))
    }

    fn opt_export_name(sock: &mut S, name: &str, no_zeroes: bool) -> Result<Export, ClientError> {
        Self::send_opt(sock, OPT_EXPORT_NAME, name.as_bytes())?;
        let b: [u8; 10] = read_n(sock)?;
        if !no_zeroes {
            skip(sock, 124)?;
        }
        Ok(Export {
            size: be64(&b[0..8]),
            flags: be16(&b[8..10]),
        })
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        // The header on its own: the data is not copied (the worker's
        // memory is locked and small).
        let mut m = [0u8; 28];
        m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[6..8].copy_from_slice(&cmd.to_be_bytes());
        m[8..16].copy_from_slice(&handle.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        self.sock.write_all(&m)?;
        self.sock.write_all(data)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64, what: &'static str) -> Result<(), ClientError> {
        let r: [u8; 16] = read_n(&mut self.sock)?;
        if be32(&r[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!("bad reply magic to {what}")));
        }
        if be64(&r[8..16]) != handle {
            return Err(ClientError::Protocol(format!(
                "a reply to {what} with a handle never sent"
            )));
        }
        match be32(&r[4..8]) {
            0 => Ok(()),
            code => Err(ClientError::Refused { what, code }),
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<u32, ClientError> {
        let l = u32::try_from(len)
            .ok()
            .filter(|l| (*l as usize) <= MAX_REQUEST)
            .ok_or_else(|| ClientError::Protocol(format!("request of {len} bytes")))?;
        if offset
            .checked_add(u64::from(l))
            .is_none_or(|end| end > self.export.size)
        {
            return Err(ClientError::Protocol(format!(
                "request beyond the export's {} bytes",
                self.export.size
            )));
        }
        Ok(l)
    }

    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), ClientError> {
        for (i, piece) in data.chunks(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            let l = self.check(off, piece.len())?;
            let h = self.request(CMD_WRITE, off, l, piece)?;
            self.reply(h, "a write")?;
        }
        Ok(())
    }

    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        for (i, piece) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            let l = self.check(off, piece.len())?;
            let h = self.request(CMD_READ, off, l, &[])?;
            self.reply(h, "a read")?;
            self.sock.read_exact(piece)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.export.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let h = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply(h, "a flush")
    }

    /// `NBD_CMD_DISC`, best effort.
    pub fn disconnect(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A socket: reads from a script, writes collected.
    struct Script {
        rx: Cursor<Vec<u8>>,
        tx: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.rx.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.tx.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    fn opt_reply(rtype: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&rtype.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        opt_reply(REP_INFO, &d)
    }

    fn run(rx: Vec<u8>) -> Result<NbdClient<Script>, ClientError> {
        NbdClient::handshake(
            Script {
                rx: Cursor::new(rx),
                tx: Vec::new(),
            },
            "",
        )
    }

    #[test]
    fn opt_go_with_export_info_negotiates() {
        let mut rx = greeting();
        rx.extend(opt_reply(REP_INFO, &[0, 9, 1, 2, 3])); // an unknown info
        rx.extend(info(1 << 20, TFLAG_SEND_FLUSH));
        rx.extend(opt_reply(REP_ACK, &[]));
        let c = run(rx).unwrap();
        assert_eq!(c.export.size, 1 << 20);
    }

    #[test]
    fn hostile_handshakes_fail_cleanly() {
        // Oversized reply length, before anything is allocated.
        let mut rx = greeting();
        let mut r = opt_reply(REP_INFO, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        rx.extend(r);
        assert!(matches!(run(rx), Err(ClientError::Protocol(_))));
        // ACK without export info.
        let mut rx = greeting();
        rx.extend(opt_reply(REP_ACK, &[]));
        assert!(run(rx).is_err());
        // Read-only export.
        let mut rx = greeting();
        rx.extend(info(4096, TFLAG_READ_ONLY));
        rx.extend(opt_reply(REP_ACK, &[]));
        assert!(matches!(run(rx), Err(ClientError::ReadOnly)));
        // Truncated greeting, wrong magic, endless replies.
        assert!(run(greeting()[..10].to_vec()).is_err());
        assert!(matches!(run(vec![0; 18]), Err(ClientError::NotNbd(_))));
        let mut rx = greeting();
        for _ in 0..=MAX_OPT_REPLIES {
            rx.extend(opt_reply(REP_INFO, &[0, 9]));
        }
        assert!(run(rx).is_err());
    }

    #[test]
    fn a_reply_with_an_unsent_handle_is_refused() {
        let mut rx = greeting();
        rx.extend(info(4096, 0));
        rx.extend(opt_reply(REP_ACK, &[]));
        let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&99u64.to_be_bytes());
        rx.extend(reply);
        let mut c = run(rx).unwrap();
        assert!(matches!(
            c.write_at(&[1; 512], 0),
            Err(ClientError::Protocol(_))
        ));
        assert!(c.write_at(&[1; 512], 4000).is_err(), "beyond the export");
    }
}
