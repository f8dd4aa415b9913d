//! What tap-ctl, the broker and the workers share: the wire protocol and its
//! framing, fd passing, minors, state bits and stats types.
//!
//! Nothing here decides policy or parses image bytes.

pub mod adminfile;
pub mod audit;
pub mod frame;
pub mod minor;
pub mod proto;
pub mod qos;
pub mod secret;
pub mod signals;
pub mod state;
pub mod stats;
pub mod sys;
pub mod ublk_abi;
pub mod worker_proto;
pub mod xapi;

pub use minor::Minor;

/// An error and its causes, `: `-separated, each said once. Many errors
/// print their source in their own message too (`I/O error ...: No such
/// file or directory`), which anyhow's `{:#}` would repeat.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// `eprintln!`, but the whole line in one `write(2)`.
///
/// Standard error is unbuffered and `eprintln!` writes each formatted piece
/// separately, so whoever reads our log while we run (the broker relaying a
/// worker's stderr, an operator's `tail -f`, a test waiting for "serving ...
/// (worker pid N)") could see half a line: a truncated pid or count reads as
/// a different, valid-looking number. Formatting first and writing once
/// keeps every line whole (a pipe write of at most `PIPE_BUF` bytes is also
/// atomic against other writers).
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        let mut line = ::std::format!($($arg)*);
        line.push('\n');
        let _ = ::std::io::Write::write_all(&mut ::std::io::stderr().lock(), line.as_bytes());
    }};
}
