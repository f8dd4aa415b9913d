//! A worker's stderr, read by the broker and passed on bounded.
//!
//! A worker parses hostile images; whatever it writes may have been chosen
//! by an attacker. Its fd 2 is therefore a pipe, never the broker's own
//! stderr (the journal): one thread reads all of them (`log_reader`) and logs each line
//! as a `tracing` event of target `tapdisk` whose `pid` and `minor` fields
//! the broker sets and whose `line` field carries the worker's bytes as an
//! opaque string: every byte outside printable ASCII escaped (no terminal
//! escapes, no newline or carriage return starting a forged line), cut at
//! [`MAX_LINE`] bytes, at most [`BURST`] lines at once and
//! [`LINES_PER_SEC`] a second on average; what is dropped is counted and the
//! count is logged. The JSON formatter quotes `line` as a string, so a
//! worker that writes `{"minor":5}` or `tap-broker: ...` only ever appears
//! inside its own line, under its own pid and minor.
//!
//! The worker writes JSON lines, but the broker does not parse them (it
//! parses no untrusted bytes): it only compares a line's first bytes with
//! the five constant prefixes `{"level":"ERROR"` ... to log it at the level
//! the worker gave it, so that `TAPJAIL_LOG=tapdisk=warn` works. A worker
//! that lies about a level changes only how its own line is filtered.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tapjail_common::Minor;

/// Longest part of one line that is kept (bytes, before escaping).
pub const MAX_LINE: usize = 512;
/// Lines a worker may write at once after a quiet spell.
pub const BURST: u32 = 50;
/// Lines a second a worker may write on average.
pub const LINES_PER_SEC: u32 = 10;
/// How often a reader with dropped lines reports their count while its
/// worker is quiet.
pub const TICK: Duration = Duration::from_secs(1);

/// Which minor each worker serves, for the tag. Kept here (not looked up
/// in the broker's table) so that a reader never waits on the table lock:
/// an operation holding it may be waiting on this very worker, which may
/// be blocked writing to a full pipe.
static MINORS: Mutex<Option<HashMap<u32, Minor>>> = Mutex::new(None);

/// Record that `minor` is served by `worker` (or by none). Called when a
/// disk's record changes.
pub fn tag(minor: Minor, worker: Option<u32>) {
    let mut m = MINORS.lock().unwrap_or_else(|e| e.into_inner());
    let map = m.get_or_insert_with(HashMap::new);
    map.retain(|_, v| *v != minor);
    if let Some(pid) = worker {
        map.insert(pid, minor);
    }
}

pub(crate) fn minor_of(pid: u32) -> Option<Minor> {
    let m = MINORS.lock().unwrap_or_else(|e| e.into_inner());
    m.as_ref().and_then(|map| map.get(&pid).copied())
}

/// A pipe for a new worker's stderr: the write end goes to the child, the
/// read end to [`forward`]. Both close on exec.
pub fn pipe() -> io::Result<(io::PipeReader, io::PipeWriter)> {
    io::pipe()
}

/// Read worker `pid`'s stderr until the worker and every copy of the
/// write end are gone (on the one log thread, `log_reader`).
pub fn forward(pipe: io::PipeReader, pid: u32) {
    if let Err(e) = crate::log_reader::add(pipe, pid) {
        // The worker's writes then fail with EPIPE; it keeps working.
        tracing::warn!(
            pid,
            "no log reader for tapdisk[{pid}]: {e}; its log lines are lost"
        );
    }
}

/// What the filter passes on for one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// One line, escaped; `cut` bytes beyond [`MAX_LINE`] were thrown away.
    Line { text: String, cut: usize },
    /// This many lines were dropped by the rate limit.
    Dropped(u64),
}

/// The level a worker gave its JSON line, read from the line's first bytes
/// only (see the module doc); anything else is `INFO`.
pub fn level_of(text: &str) -> tracing::Level {
    use tracing::Level;
    const PREFIXES: [(&str, Level); 5] = [
        ("{\"level\":\"ERROR\"", Level::ERROR),
        ("{\"level\":\"WARN\"", Level::WARN),
        ("{\"level\":\"INFO\"", Level::INFO),
        ("{\"level\":\"DEBUG\"", Level::DEBUG),
        ("{\"level\":\"TRACE\"", Level::TRACE),
    ];
    PREFIXES
        .iter()
        .find(|(p, _)| text.starts_with(p))
        .map_or(Level::INFO, |(_, l)| *l)
}

/// Log what the filter passed on for worker `pid` serving `minor`.
pub fn log(pid: u32, minor: Option<Minor>, r: &Relayed) {
    let minor = minor.map(Minor::get);
    match r {
        Relayed::Line { text, cut } => {
            let cut = (*cut > 0).then_some(*cut);
            let line = text.as_str();
            macro_rules! relay {
                ($level:expr) => {
                    tracing::event!(target: "tapdisk", $level, pid, minor, cut, line, "worker line")
                };
            }
            match level_of(text) {
                tracing::Level::ERROR => relay!(tracing::Level::ERROR),
                tracing::Level::WARN => relay!(tracing::Level::WARN),
                tracing::Level::DEBUG => relay!(tracing::Level::DEBUG),
                tracing::Level::TRACE => relay!(tracing::Level::TRACE),
                _ => relay!(tracing::Level::INFO),
            }
        }
        Relayed::Dropped(n) => tracing::warn!(
            target: "tapdisk",
            pid,
            minor,
            dropped = n,
            "{n} worker line(s) dropped (more than {LINES_PER_SEC} lines/s)"
        ),
    }
}

/// Splits a byte stream into escaped, bounded, rate-limited lines.
#[derive(Debug)]
pub struct LineFilter {
    /// The current line so far (at most [`MAX_LINE`] bytes).
    line: Vec<u8>,
    /// Bytes of the current line beyond [`MAX_LINE`], thrown away.
    cut: usize,
    /// Token bucket: lines that may be written now, and when it was filled.
    tokens: f64,
    filled: Instant,
    /// Lines dropped since the last count was written.
    dropped: u64,
}

impl LineFilter {
    pub fn new() -> LineFilter {
        LineFilter {
            line: Vec::new(),
            cut: 0,
            tokens: f64::from(BURST),
            filled: Instant::now(),
            dropped: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.filled).as_secs_f64();
        self.tokens = (self.tokens + secs * f64::from(LINES_PER_SEC)).min(f64::from(BURST));
        self.filled = now;
    }

    /// Write the dropped count if there is one (it costs no token: it is
    /// what tells the reader of the log that lines are missing).
    fn report_drops(&mut self, out: &mut dyn FnMut(Relayed)) {
        if self.dropped > 0 {
            out(Relayed::Dropped(self.dropped));
            self.dropped = 0;
        }
    }

    fn emit(&mut self, now: Instant, out: &mut dyn FnMut(Relayed)) {
        self.refill(now);
        let line = std::mem::take(&mut self.line);
        let cut = std::mem::replace(&mut self.cut, 0);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return;
        }
        self.tokens -= 1.0;
        self.report_drops(out);
        let mut text = escape(&line);
        if cut > 0 {
            text.push_str(&format!("... ({cut} more bytes cut)"));
        }
        out(Relayed::Line { text, cut });
    }

    /// Take bytes from the pipe; write every line they complete.
    pub fn feed(&mut self, bytes: &[u8], now: Instant, out: &mut dyn FnMut(Relayed)) {
        for &b in bytes {
            if b == b'\n' {
                self.emit(now, out);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                self.cut += 1;
            }
        }
    }

    /// The worker is quiet: write the count of what was dropped.
    pub fn tick(&mut self, now: Instant, out: &mut dyn FnMut(Relayed)) {
        self.refill(now);
        if self.dropped > 0 && self.tokens >= 1.0 {
            self.report_drops(out);
        }
    }

    /// The pipe closed: write a last unterminated line and the count.
    pub fn finish(&mut self, now: Instant, out: &mut dyn FnMut(Relayed)) {
        if !self.line.is_empty() || self.cut > 0 {
            self.emit(now, out);
        }
        self.report_drops(out);
    }
}

/// Printable ASCII as is (`\` doubled), every other byte as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

impl Default for LineFilter {
    fn default() -> Self {
        LineFilter::new()
    }
}

#[cfg(test)]
mod tests;
