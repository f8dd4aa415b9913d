//! What tap-ctl, the broker and the workers share: the wire protocol and its
//! framing, fd passing, minors, state bits and stats types.
//!
//! Nothing here decides policy or parses image bytes.

pub mod adminfile;
pub mod audit;
pub mod cbt;
pub mod coalesce;
pub mod empty_root;
pub mod frame;
pub mod logging;
pub mod minor;
pub mod mirror;
pub mod proto;
pub mod qos;
pub mod read_cache;
pub mod secret;
pub mod signals;
pub mod snapshot;
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

/// A log line at info level: a `tracing` event with the formatted text as
/// its message, kept so that code written before tapjail logged through
/// `tracing` (and branches still adding such lines) keeps compiling. New
/// code uses `tracing::{error,warn,info,debug}!` with fields (`minor`,
/// `pid`, `tenant`, `image`, `request`).
///
/// The line is still written whole, with one `write(2)`: standard error is
/// unbuffered and `eprintln!` writes each formatted piece separately, so
/// whoever reads our log while we run (the broker relaying a worker's
/// stderr, an operator's `tail -f`, a test waiting for "serving ...
/// (worker pid N)") could see half a line, and a truncated pid or count
/// reads as a different, valid-looking number. The subscriber
/// [`logging::init`] installs formats each event first and writes it once;
/// before (or without) it, this macro formats the line and writes it once
/// itself. A pipe write of at most `PIPE_BUF` bytes is also atomic against
/// other writers.
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        let line = ::std::format!($($arg)*);
        if $crate::logging::subscribed() {
            $crate::__tracing::info!("{}", line);
        } else {
            let mut line = line;
            line.push('\n');
            let _ = ::std::io::Write::write_all(&mut ::std::io::stderr().lock(), line.as_bytes());
        }
    }};
}

#[doc(hidden)]
pub use tracing as __tracing;
