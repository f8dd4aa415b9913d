//! Fixed-newstyle option haggling, up to the transmission phase.
//!
//! Generic over the stream so that it can be driven from tests with a
//! socketpair. A client gets an error reply for anything it may retry
//! (unknown options, bad option data, an unknown export name); we hang up
//! only where the protocol leaves no way to answer (bad magic, unknown
//! client flags, an unknown name with `NBD_OPT_EXPORT_NAME`) or where a
//! client looks like a denial of service (too many options, an option
//! payload too large to skip).

use super::proto::*;
use std::io::{self, Read, Write};

/// Options one connection may send before it must pick an export.
pub const MAX_OPTIONS: u32 = 64;

/// The one export a worker serves.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Its name; the empty name (the "default export") also reaches it.
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// Shown to clients that ask (NBD_INFO_DESCRIPTION).
    pub description: String,
    /// Largest READ/WRITE payload, advertised as the maximum block size.
    pub max_payload: u32,
    /// Changed-block bitmaps offered as `qemu:dirty-bitmap:NAME`:
    /// (name, id) as tracked when the client connected.
    pub bitmaps: Vec<(String, u64)>,
}

impl ExportInfo {
    fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// Transmission flags for a session.
    pub fn tflags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            // Every connection shares one image and one page cache (or
            // none, with O_DIRECT), and FLUSH syncs the whole file.
            | TFLAG_CAN_MULTI_CONN;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        }
        f
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O during negotiation: {0}")]
    Io(#[from] io::Error),
    #[error("client violated the protocol: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(msg.into())
}

/// How negotiation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Proceed to transmission with these settings.
    Transmission(Session),
    /// The client aborted (NBD_OPT_ABORT) or listed and left.
    Aborted,
}

struct Haggle<'a, S> {
    s: &'a mut S,
    export: &'a ExportInfo,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
    dirty_bitmap: Option<u64>,
}

/// Negotiate with a freshly accepted client.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &ExportInfo,
) -> Result<Outcome, HandshakeError> {
    s.write_all(&server_greeting())?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let mut h = Haggle {
        s,
        export,
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        base_allocation: false,
        dirty_bitmap: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(outcome) = h.option()? {
            return Ok(outcome);
        }
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options")))
}

impl<S: Read + Write> Haggle<'_, S> {
    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        self.s.write_all(&option_reply(option, reply, data))
    }

    fn error(&mut self, option: u32, reply: u32, msg: &str) -> io::Result<()> {
        self.reply(option, reply, msg.as_bytes())
    }

    fn session(&self) -> Session {
        Session {
            size: self.export.size,
            read_only: self.export.read_only,
            structured: self.structured,
            base_allocation: self.structured && self.base_allocation,
            dirty_bitmap: self.dirty_bitmap.filter(|_| self.structured),
            max_payload: self.export.max_payload,
        }
    }

    /// Handle one option; `Some` ends negotiation.
    fn option(&mut self) -> Result<Option<Outcome>, HandshakeError> {
        let mut hb = [0u8; 16];
        self.s.read_exact(&mut hb)?;
        let hdr = parse_option_header(&hb).map_err(|e| protocol(e.to_string()))?;
        if hdr.len > MAX_OPTION_DATA {
            if hdr.len > MAX_OPTION_SKIP || !self.fixed {
                return Err(protocol(format!("option data of {} bytes", hdr.len)));
            }
            io::copy(
                &mut (&mut *self.s).take(u64::from(hdr.len)),
                &mut io::sink(),
            )?;
            self.error(hdr.option, REP_ERR_TOO_BIG, "option data too large")?;
            return Ok(None);
        }
        let mut data = vec![0u8; hdr.len as usize];
        self.s.read_exact(&mut data)?;
        if !self.fixed && hdr.option != OPT_EXPORT_NAME {
            return Err(protocol(
                "non-fixed newstyle client sent an option other than EXPORT_NAME",
            ));
        }
        match hdr.option {
            OPT_EXPORT_NAME => {
                let name =
                    std::str::from_utf8(&data).map_err(|_| protocol("export name is not UTF-8"))?;
                if !self.export.answers_to(name) {
                    // No way to answer with an error here: hang up.
                    return Err(protocol(format!("unknown export {name:?}")));
                }
                let tflags = self.export.tflags(self.structured);
                self.s
                    .write_all(&export_name_reply(self.export.size, tflags, self.no_zeroes))?;
                Ok(Some(Outcome::Transmission(self.session())))
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = self.reply(OPT_ABORT, REP_ACK, &[]);
                Ok(Some(Outcome::Aborted))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(OPT_LIST, REP_ERR_INVALID, "OPT_LIST takes no data")?;
                } else {
                    let name = self.export.name.clone();
                    self.reply(OPT_LIST, REP_SERVER, &rep_server(&name))?;
                    self.reply(OPT_LIST, REP_ACK, &[])?;
                }
                Ok(None)
            }
            OPT_STARTTLS => {
                self.error(
                    OPT_STARTTLS,
                    REP_ERR_POLICY,
                    "TLS is not offered on this socket",
                )?;
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info_or_go(hdr.option, &data),
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])?;
                } else {
                    self.error(
                        hdr.option,
                        REP_ERR_INVALID,
                        "OPT_STRUCTURED_REPLY takes no data",
                    )?;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(hdr.option, &data)?;
                Ok(None)
            }
            other => {
                self.error(other, REP_ERR_UNSUP, "option not supported")?;
                Ok(None)
            }
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Outcome>, HandshakeError> {
        let req = match parse_go(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &e.to_string())?;
                return Ok(None);
            }
        };
        if !self.export.answers_to(&req.name) {
            self.error(option, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        }
        for kind in req.info.iter().copied() {
            let info = match kind {
                INFO_NAME => info_string(INFO_NAME, &self.export.name),
                INFO_DESCRIPTION => info_string(INFO_DESCRIPTION, &self.export.description),
                INFO_BLOCK_SIZE => info_block_size(self.export.max_payload),
                _ => continue, // INFO_EXPORT is always sent below; others are unknown
            };
            self.reply(option, REP_INFO, &info)?;
        }
        let tflags = self.export.tflags(self.structured);
        self.reply(option, REP_INFO, &info_export(self.export.size, tflags))?;
        self.reply(option, REP_ACK, &[])?;
        Ok((option == OPT_GO).then(|| Outcome::Transmission(self.session())))
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            )?;
            return Ok(());
        }
        let req = match parse_meta(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &e.to_string())?;
                return Ok(());
            }
        };
        if !self.export.answers_to(&req.export) {
            self.error(option, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(());
        }
        let set = option == OPT_SET_META_CONTEXT;
        let all = !set && req.queries.is_empty();
        let matched = all
            || req.queries.iter().any(|q| {
                if set {
                    q == META_BASE_ALLOCATION
                } else {
                    query_matches_base_allocation(q)
                }
            });
        // One bitmap may be selected (the first one named); listing names
        // every one a query covers.
        let bitmaps: Vec<(String, u64)> = self
            .export
            .bitmaps
            .iter()
            .filter(|(name, _)| {
                all || req.queries.iter().any(|q| {
                    if set {
                        q.strip_prefix(META_DIRTY_BITMAP_PREFIX) == Some(name.as_str())
                    } else {
                        query_matches_bitmap(q, name)
                    }
                })
            })
            .take(if set { 1 } else { usize::MAX })
            .cloned()
            .collect();
        if set {
            self.base_allocation = matched;
            self.dirty_bitmap = bitmaps.first().map(|(_, id)| *id);
        }
        if matched {
            let id = if set {
                META_BASE_ALLOCATION_ID
            } else {
                0 // reserved for LIST replies
            };
            self.reply(
                option,
                REP_META_CONTEXT,
                &rep_meta_context(id, META_BASE_ALLOCATION),
            )?;
        }
        for (name, _) in &bitmaps {
            let id = if set { META_DIRTY_BITMAP_ID } else { 0 };
            let context = format!("{META_DIRTY_BITMAP_PREFIX}{name}");
            self.reply(option, REP_META_CONTEXT, &rep_meta_context(id, &context))?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            size: 1 << 20,
            read_only: false,
            description: "test".into(),
            max_payload: MAX_PAYLOAD,
            bitmaps: vec![("daily".into(), 7), ("weekly".into(), 9)],
        }
    }

    fn meta_data(queries: &[&str]) -> Vec<u8> {
        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        meta
    }

    /// Every REP_META_CONTEXT up to the ACK, as (id, name).
    fn contexts(c: &mut UnixStream) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        loop {
            let (_, rep, data) = read_reply(c);
            if rep == REP_ACK {
                return out;
            }
            assert_eq!(rep, REP_META_CONTEXT);
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            out.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
        }
    }

    #[test]
    fn dirty_bitmaps_are_listed_by_namespace_and_one_is_selected_by_name() {
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        send_option(&mut c, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        send_option(&mut c, OPT_LIST_META_CONTEXT, &meta_data(&[]));
        let all: Vec<String> = contexts(&mut c).into_iter().map(|(_, n)| n).collect();
        assert_eq!(
            all,
            [
                "base:allocation",
                "qemu:dirty-bitmap:daily",
                "qemu:dirty-bitmap:weekly"
            ]
        );
        send_option(&mut c, OPT_LIST_META_CONTEXT, &meta_data(&["qemu:"]));
        assert_eq!(contexts(&mut c).len(), 2);
        send_option(
            &mut c,
            OPT_LIST_META_CONTEXT,
            &meta_data(&["qemu:dirty-bitmap:weekly"]),
        );
        assert_eq!(
            contexts(&mut c),
            [(0, "qemu:dirty-bitmap:weekly".to_string())]
        );
        // A prefix selects nothing with SET (only exact names do).
        send_option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_data(&["qemu:dirty-bitmap:wee"]),
        );
        assert_eq!(contexts(&mut c), []);
        send_option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_data(&["qemu:dirty-bitmap:weekly"]),
        );
        assert_eq!(
            contexts(&mut c),
            [(META_DIRTY_BITMAP_ID, "qemu:dirty-bitmap:weekly".to_string())]
        );
        send_option(&mut c, OPT_GO, &go_data("", &[]));
        while read_reply(&mut c).1 != REP_ACK {}
        let Outcome::Transmission(s) = t.join().unwrap().unwrap() else {
            panic!("no transmission")
        };
        assert_eq!((s.base_allocation, s.dirty_bitmap), (false, Some(9)));
    }

    /// Run negotiate on one end of a socketpair; the test drives the other.
    fn server() -> (
        UnixStream,
        std::thread::JoinHandle<Result<Outcome, HandshakeError>>,
    ) {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || negotiate(&mut a, &export()));
        (b, t)
    }

    fn read_greeting(c: &mut UnixStream) {
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
    }

    fn send_option(c: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).unwrap();
    }

    /// (option, reply type, data) of the next option reply.
    fn read_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation_enters_transmission() {
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        send_option(&mut c, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        send_option(&mut c, OPT_SET_META_CONTEXT, &meta);
        let (_, rep, data) = read_reply(&mut c);
        assert_eq!(rep, REP_META_CONTEXT);
        assert_eq!(&data[..4], &META_BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        send_option(&mut c, OPT_GO, &go_data("", &[INFO_BLOCK_SIZE]));
        let (_, rep, data) = read_reply(&mut c);
        assert_eq!(
            (rep, &data[..2]),
            (REP_INFO, &INFO_BLOCK_SIZE.to_be_bytes()[..])
        );
        let (_, rep, data) = read_reply(&mut c);
        assert_eq!(
            (rep, &data[..2]),
            (REP_INFO, &INFO_EXPORT.to_be_bytes()[..])
        );
        assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), 1 << 20);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        let outcome = t.join().unwrap().unwrap();
        assert_eq!(
            outcome,
            Outcome::Transmission(Session {
                size: 1 << 20,
                read_only: false,
                structured: true,
                base_allocation: true,
                dirty_bitmap: None,
                max_payload: MAX_PAYLOAD,
            })
        );
    }

    #[test]
    fn unknown_option_and_unknown_export_get_errors_then_list_and_abort() {
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        send_option(&mut c, 0x1234, b"junk");
        assert_eq!(read_reply(&mut c).1, REP_ERR_UNSUP);
        send_option(&mut c, OPT_GO, &go_data("other", &[]));
        assert_eq!(read_reply(&mut c).1, REP_ERR_UNKNOWN);
        send_option(&mut c, OPT_GO, &[0, 0, 0, 9]); // truncated name
        assert_eq!(read_reply(&mut c).1, REP_ERR_INVALID);
        send_option(&mut c, OPT_LIST, &[]);
        let (_, rep, data) = read_reply(&mut c);
        assert_eq!(rep, REP_SERVER);
        assert_eq!(&data[4..], b"disk");
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        send_option(&mut c, OPT_SET_META_CONTEXT, &[]);
        assert_eq!(
            read_reply(&mut c).1,
            REP_ERR_INVALID,
            "needs structured replies"
        );
        send_option(&mut c, OPT_ABORT, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        assert_eq!(t.join().unwrap().unwrap(), Outcome::Aborted);
    }

    #[test]
    fn garbage_and_floods_are_hung_up_on() {
        // Unknown client flags.
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&0xffu32.to_be_bytes()).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
        // Bad option magic.
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        c.write_all(&[0x41; 16]).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
        // A huge option length.
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        let mut h = Vec::new();
        h.extend_from_slice(&IHAVEOPT.to_be_bytes());
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&h).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
        // Endless options.
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        for _ in 0..MAX_OPTIONS {
            send_option(&mut c, 0x999, &[]);
            assert_eq!(read_reply(&mut c).1, REP_ERR_UNSUP);
        }
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
    }

    /// A client that sends fixed bytes and swallows whatever we answer.
    struct Scripted(std::io::Cursor<Vec<u8>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    proptest::proptest! {
        #[test]
        fn negotiation_never_panics_on_random_client_bytes(
            flags in 0u32..4,
            opts in proptest::collection::vec(
                (0u32..12, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                0..8,
            ),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            // Mostly well-framed options with random payloads, then noise.
            let mut b = flags.to_be_bytes().to_vec();
            for (opt, data) in &opts {
                b.extend_from_slice(&IHAVEOPT.to_be_bytes());
                b.extend_from_slice(&opt.to_be_bytes());
                b.extend_from_slice(&(data.len() as u32).to_be_bytes());
                b.extend_from_slice(data);
            }
            b.extend_from_slice(&tail);
            let _ = negotiate(&mut Scripted(std::io::Cursor::new(b)), &export());
        }
    }

    #[test]
    fn export_name_option_replies_with_size_and_flags() {
        let (mut c, t) = server();
        read_greeting(&mut c);
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        send_option(&mut c, OPT_EXPORT_NAME, b"disk");
        let mut r = [0u8; 134];
        c.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 1 << 20);
        let flags = u16::from_be_bytes([r[8], r[9]]);
        assert_eq!(flags & TFLAG_SEND_DF, 0, "no DF without structured replies");
        assert!(matches!(
            t.join().unwrap().unwrap(),
            Outcome::Transmission(_)
        ));
    }
}
