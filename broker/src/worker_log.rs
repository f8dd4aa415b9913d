//! A worker's stderr, read by the broker and passed on bounded.
//!
//! A worker parses hostile images; whatever it writes may have been chosen
//! by an attacker. Its fd 2 is therefore a pipe, never the broker's own
//! stderr (the journal): one thread reads all of them (`log_reader`) and
//! writes each line tagged with the worker's pid and minor (`tapdisk[PID] minor N: `),
//! with every byte outside printable ASCII escaped (no terminal escapes,
//! no carriage returns forging another line), cut at [`MAX_LINE`] bytes,
//! and at most [`BURST`] lines at once and [`LINES_PER_SEC`] a second on
//! average; what is dropped is counted and the count is written.

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

fn minor_of(pid: u32) -> Option<Minor> {
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
        tapjail_common::log_line!("tap-broker: no log reader for tapdisk[{pid}]: {e}");
    }
}

/// Splits a byte stream into tagged, escaped, bounded, rate-limited lines.
#[derive(Debug)]
pub struct LineFilter {
    pid: u32,
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
    pub fn new(pid: u32) -> LineFilter {
        LineFilter {
            pid,
            line: Vec::new(),
            cut: 0,
            tokens: f64::from(BURST),
            filled: Instant::now(),
            dropped: 0,
        }
    }

    fn prefix(&self) -> String {
        match minor_of(self.pid) {
            Some(m) => format!("tapdisk[{}] minor {m}: ", self.pid),
            None => format!("tapdisk[{}]: ", self.pid),
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.filled).as_secs_f64();
        self.tokens = (self.tokens + secs * f64::from(LINES_PER_SEC)).min(f64::from(BURST));
        self.filled = now;
    }

    /// Write the dropped count if there is one (it costs no token: it is
    /// what tells the reader of the log that lines are missing).
    fn report_drops(&mut self, out: &mut dyn FnMut(String)) {
        if self.dropped > 0 {
            out(format!(
                "{}{} line(s) dropped (more than {LINES_PER_SEC} lines/s)",
                self.prefix(),
                self.dropped
            ));
            self.dropped = 0;
        }
    }

    fn emit(&mut self, now: Instant, out: &mut dyn FnMut(String)) {
        self.refill(now);
        let line = std::mem::take(&mut self.line);
        let cut = std::mem::replace(&mut self.cut, 0);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return;
        }
        self.tokens -= 1.0;
        self.report_drops(out);
        let mut text = self.prefix();
        text.push_str(&escape(&line));
        if cut > 0 {
            text.push_str(&format!("... ({cut} more bytes cut)"));
        }
        out(text);
    }

    /// Take bytes from the pipe; write every line they complete.
    pub fn feed(&mut self, bytes: &[u8], now: Instant, out: &mut dyn FnMut(String)) {
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
    pub fn tick(&mut self, now: Instant, out: &mut dyn FnMut(String)) {
        self.refill(now);
        if self.dropped > 0 && self.tokens >= 1.0 {
            self.report_drops(out);
        }
    }

    /// The pipe closed: write a last unterminated line and the count.
    pub fn finish(&mut self, now: Instant, out: &mut dyn FnMut(String)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(filter: &mut LineFilter, bytes: &[u8], now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        filter.feed(bytes, now, &mut |l| lines.push(l));
        lines
    }

    #[test]
    fn escape_leaves_no_control_byte() {
        let e = escape(b"a\x1b[2J\rb\\\xff\x07");
        assert_eq!(e, "a\\x1b[2J\\x0db\\\\\\xff\\x07");
        assert!(e.bytes().all(|b| (0x20..0x7f).contains(&b)));
    }

    #[test]
    fn lines_are_tagged_escaped_and_cut() {
        let pid = 4_000_001;
        tag(Minor::new(7).unwrap(), Some(pid));
        let mut f = LineFilter::new(pid);
        let now = Instant::now();
        let mut bytes = b"hello \x1b]0;owned\x07\n".to_vec();
        bytes.extend(vec![b'x'; 10_000]);
        bytes.push(b'\n');
        let lines = run(&mut f, &bytes, now);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            format!("tapdisk[{pid}] minor 7: hello \\x1b]0;owned\\x07")
        );
        assert!(lines[1].starts_with(&format!("tapdisk[{pid}] minor 7: xxxx")));
        assert!(lines[1].ends_with(&format!("... ({} more bytes cut)", 10_000 - MAX_LINE)));
        assert!(lines[1].len() < MAX_LINE + 100);
        // Detached: the tag follows.
        tag(Minor::new(7).unwrap(), None);
        assert_eq!(
            run(&mut f, b"bye\n", now),
            vec![format!("tapdisk[{pid}]: bye")]
        );
    }

    #[test]
    fn a_flood_is_cut_to_the_burst_and_the_drop_is_counted() {
        let mut f = LineFilter::new(4_000_002);
        let t0 = Instant::now();
        let flood = b"spam\n".repeat(10_000);
        let lines = run(&mut f, &flood, t0);
        assert_eq!(lines.len(), BURST as usize);
        // Quiet for a second: the count is written, then lines flow again.
        let mut later = Vec::new();
        f.tick(t0 + Duration::from_secs(1), &mut |l| later.push(l));
        assert_eq!(
            later,
            vec![format!(
                "tapdisk[4000002]: {} line(s) dropped (more than {LINES_PER_SEC} lines/s)",
                10_000 - BURST
            )]
        );
        let more = run(&mut f, b"again\n", t0 + Duration::from_secs(1));
        assert_eq!(more, vec!["tapdisk[4000002]: again".to_string()]);
    }

    #[test]
    fn finish_writes_the_unterminated_line_and_the_count() {
        let mut f = LineFilter::new(4_000_003);
        let t0 = Instant::now();
        let _ = run(&mut f, &b"x\n".repeat(BURST as usize + 3), t0);
        let _ = run(&mut f, b"tail", t0);
        let mut last = Vec::new();
        f.finish(t0, &mut |l| last.push(l));
        assert_eq!(last.len(), 1, "{last:?}");
        assert!(last[0].contains("4 line(s) dropped"), "{last:?}");
    }
}
