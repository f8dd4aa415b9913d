//! The broker's audit log: one JSON object per line, each carrying `prev`,
//! the SHA-256 (hex) of the previous line's bytes (without its newline), so
//! that altering, inserting or removing a line breaks the chain at the next
//! one. The first line of a log has `prev` = 64 zeros ([`GENESIS`]).
//!
//! The broker appends and fsyncs a line before it replies ([`AuditLog`]);
//! `tap-ctl audit verify` checks a file with [`verify`].
//!
//! Limits of a hash chain, stated so nobody relies on more: whoever can
//! rewrite the whole file can recompute every hash, and removing lines from
//! the end leaves a valid (shorter) chain. Ship the log off the host (or
//! record the last hash elsewhere) to detect those.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

mod verify;
mod writer;

pub use verify::*;
pub use writer::*;

/// `prev` of a log's first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line the writer produces and the verifier accepts. Requests are
/// at most [`crate::frame::MAX_REQUEST_FRAME`] bytes of postcard, which
/// stays far below this as JSON.
pub const MAX_LINE: usize = 1024 * 1024;

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A client request, decided by policy.
    Request,
    /// A malformed, oversized or truncated frame; the connection was closed.
    FrameError,
    /// A worker asked for a differencing image's parent.
    ParentOpen,
    /// A worker exited (expected or not).
    WorkerExit,
    /// A dead worker was replaced by a fresh one.
    WorkerRespawn,
    /// The broker started (and what it cleaned up from a predecessor).
    BrokerStart,
    /// The broker is shutting down.
    BrokerStop,
    /// Leftovers of a previous broker removed.
    Cleanup,
    /// How many denials of one uid were counted but not written in full
    /// in one window (the broker's rate limit on denials anyone can
    /// cause: see `broker/src/denials.rs`).
    DenialsSuppressed,
    /// The first line of a log reopened after rotation (SIGHUP): it
    /// chains to the last line of the previous file and names it.
    Rotated,
    /// A worker, minor or kept fd left by a previous broker was taken
    /// over, or refused (and why).
    Adopt,
    /// A `-2` write mirror re-established for a respawned or unpaused
    /// worker, or lost because its secondary could not be reached.
    Mirror,
}

/// The verdict recorded on a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Not a decision: something the broker observed (a death, a start).
    Notice,
}

/// Who asked, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the broker records; [`AuditLog::append`] adds `seq`, `time` and
/// `prev`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The request as JSON (for `Request` and `ParentOpen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    pub decision: Verdict,
    /// The policy rule that decided, or the broker check that refused.
    pub rule: String,
    pub reason: String,
    /// What happened when an allowed request was carried out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// One line as written: the entry framed by sequence, time and chain.
#[derive(Debug, Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    entry: &'a Entry,
    prev: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("audit log {0} is in use by another broker (flock)")]
    Locked(String),
    #[error("cannot read the end of audit log {path}: {source}")]
    Tail {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The file exists but holds something else: appending to it would
    /// damage it (audit_log pointing at the wrong file).
    #[error("{path} is not a tapjail audit log ({why}): refusing to append to it; point audit_log at a new file or an existing audit log")]
    NotAuditLog { path: String, why: String },
    #[error("cannot write audit log: {0}")]
    Write(#[source] io::Error),
    #[error("cannot encode audit entry: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Longest a logged string may be, counted as JSON-escaped bytes (a
/// control byte costs six: `\u0001`). A longer one keeps a prefix and
/// says how long the whole value was and its SHA-256, so the line stays
/// bounded and the value can still be matched against a file or a
/// request seen elsewhere.
pub const MAX_FIELD: usize = 4096;

/// Most items of one JSON array kept in a logged request.
pub const MAX_ARRAY: usize = 64;

/// Most bytes a logged request may take as JSON after its strings are
/// capped; beyond it only its kind, length and SHA-256 are kept.
pub const MAX_REQUEST_JSON: usize = 16 * 1024;

/// Upper bound on what [`AuditLog::append`] adds around an entry's JSON
/// (`seq`, `time`, `prev`, the newline).
pub const LINE_OVERHEAD: usize = 160;

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `s` if it is at most [`MAX_FIELD`] bytes escaped; otherwise its longest
/// prefix that fits with a note of the full length and SHA-256.
pub fn cap_str(s: &str) -> std::borrow::Cow<'_, str> {
    // Stop counting at the cap: a long value is walked once, by the hash.
    let mut total = 0;
    if s.chars().all(|c| {
        total += escaped_len(c);
        total <= MAX_FIELD
    }) {
        return std::borrow::Cow::Borrowed(s);
    }
    let note = format!(
        "…[cut: {} bytes in all, sha256 {}]",
        s.len(),
        hash_hex(s.as_bytes())
    );
    let room = MAX_FIELD.saturating_sub(note.len());
    let mut used = 0;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        let n = escaped_len(c);
        if used + n > room {
            break;
        }
        used += n;
        end = i + c.len_utf8();
    }
    std::borrow::Cow::Owned(format!("{}{note}", &s[..end]))
}

/// The request's kind: the variant name of an externally tagged enum
/// (`{"Open": {...}}` or `"Spawn"`), or `"?"`.
pub fn request_kind(v: &serde_json::Value) -> String {
    let kind = match v {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Object(m) if m.len() == 1 => m.keys().next().map_or("?", String::as_str),
        _ => "?",
    };
    cap_str(kind).into_owned()
}

/// `v` with every string capped by [`cap_str`] and arrays cut at
/// [`MAX_ARRAY`] items; if it is still larger than [`MAX_REQUEST_JSON`],
/// only its kind, size and hash.
fn cap_value(v: &serde_json::Value) -> serde_json::Value {
    fn walk(v: &serde_json::Value, depth: u32) -> serde_json::Value {
        use serde_json::Value as V;
        match v {
            V::String(s) => V::String(cap_str(s).into_owned()),
            _ if depth > 16 => V::String("…[nested too deep]".into()),
            V::Array(a) => {
                let mut out: Vec<V> = a
                    .iter()
                    .take(MAX_ARRAY)
                    .map(|x| walk(x, depth + 1))
                    .collect();
                if a.len() > MAX_ARRAY {
                    out.push(V::String(format!("…[{} more items]", a.len() - MAX_ARRAY)));
                }
                V::Array(out)
            }
            V::Object(m) => V::Object(
                m.iter()
                    .map(|(k, x)| (cap_str(k).into_owned(), walk(x, depth + 1)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    let capped = walk(v, 0);
    let len = serde_json::to_vec(&capped).map_or(usize::MAX, |b| b.len());
    if len <= MAX_REQUEST_JSON {
        return capped;
    }
    let whole = serde_json::to_vec(v).unwrap_or_default();
    serde_json::json!({
        "kind": request_kind(v),
        "cut": format!("{} bytes of JSON in all, sha256 {}", whole.len(), hash_hex(&whole)),
    })
}

impl Entry {
    /// The entry as it is written: every string capped ([`cap_str`]),
    /// the request bounded. [`AuditLog::append`] applies this to every
    /// entry, so no caller can write an unbounded line.
    pub fn bounded(&self) -> Entry {
        Entry {
            event: self.event,
            peer: self.peer,
            tenant: self.tenant.as_deref().map(|t| cap_str(t).into_owned()),
            request: self.request.as_ref().map(cap_value),
            decision: self.decision,
            rule: cap_str(&self.rule).into_owned(),
            reason: cap_str(&self.reason).into_owned(),
            outcome: self.outcome.as_deref().map(|o| cap_str(o).into_owned()),
        }
    }

    /// The entry with its request reduced to its kind (`{"kind":
    /// "Open"}`): for denials of peers that match no tenant and for
    /// protocol errors, whose payload nobody accountable chose.
    pub fn kind_only(mut self) -> Entry {
        if let Some(r) = &self.request {
            self.request = Some(serde_json::json!({ "kind": request_kind(r) }));
        }
        self
    }

    /// Bytes this entry's line takes in the log, at most (for budgets).
    pub fn line_len(&self) -> usize {
        serde_json::to_vec(&self.bounded()).map_or(MAX_LINE, |b| b.len()) + LINE_OVERHEAD
    }
}

/// Hex SHA-256 of `bytes`.
pub fn hash_hex(bytes: &[u8]) -> String {
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    s
}

/// `2024-05-01T12:34:56.789Z` for `t` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::Path;
    use std::time::Duration;

    fn entry(reason: &str) -> Entry {
        Entry {
            event: Event::Request,
            peer: Some(Peer {
                pid: 1,
                uid: 1000,
                gid: 1000,
            }),
            tenant: Some("alice".into()),
            request: Some(serde_json::json!({"Free": {"minor": 3}})),
            decision: Verdict::Deny,
            rule: "foreign-minor".into(),
            reason: reason.into(),
            outcome: None,
        }
    }

    fn write_log(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append(&entry(&format!("reason {i}"))).unwrap();
        }
        (dir, path)
    }

    fn check(path: &Path) -> Result<Verified, Broken> {
        verify(io::BufReader::new(File::open(path).unwrap()))
    }

    #[test]
    fn audit_chain_of_fresh_log_verifies() {
        let (_d, path) = write_log(5);
        let v = check(&path).unwrap();
        assert_eq!(v.lines, 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["seq"], 0);
        assert_eq!(first["event"], "request");
        assert_eq!(first["decision"], "deny");
        assert_eq!(first["peer"]["uid"], 1000);
        assert_eq!(v.head, hash_hex(text.lines().last().unwrap().as_bytes()));
    }

    #[test]
    fn audit_reopen_continues_chain_and_seq() {
        let (_d, path) = write_log(3);
        {
            let mut log = AuditLog::open(&path).unwrap();
            log.append(&entry("after restart")).unwrap();
        }
        assert_eq!(check(&path).unwrap().lines, 4);
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["seq"], 3);
    }

    #[test]
    fn audit_second_writer_is_locked_out() {
        let (_d, path) = write_log(1);
        let _a = AuditLog::open(&path).unwrap();
        assert!(matches!(AuditLog::open(&path), Err(AuditError::Locked(_))));
    }

    #[test]
    fn audit_tampered_line_is_named() {
        let (_d, path) = write_log(5);
        let text = std::fs::read_to_string(&path).unwrap();
        let tampered = text.replacen("reason 2", "reason X", 1);
        std::fs::write(&path, tampered).unwrap();
        let e = check(&path).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("line 3 was altered"), "{e}");
    }

    #[test]
    fn audit_removed_line_and_removed_head_are_detected() {
        let (_d, path) = write_log(4);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
        assert_eq!(check(&path).unwrap_err().line, 2);
        std::fs::write(&path, format!("{}\n{}\n", lines[1], lines[2])).unwrap();
        let e = check(&path).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("genesis"));
    }

    #[test]
    fn audit_garbage_and_partial_lines_are_detected() {
        let (_d, path) = write_log(2);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":9");
        std::fs::write(&path, &text).unwrap();
        let e = check(&path).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("incomplete"));
        // The writer terminates the partial line and continues the chain
        // after it, so verify keeps pointing at the partial line.
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&entry("next")).unwrap();
        let e = check(&path).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("JSON"), "{e}");
        std::fs::write(&path, "not json\n").unwrap();
        assert_eq!(check(&path).unwrap_err().line, 1);
    }

    #[test]
    fn audit_open_refuses_a_file_that_is_not_an_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let text = "root:x:0:0:root:/root:/bin/bash\n";
        std::fs::write(&path, text).unwrap();
        let e = AuditLog::open(&path).unwrap_err();
        assert!(e.to_string().contains("not a tapjail audit log"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // Nor a partial line that is not the start of a record.
        std::fs::write(&path, "root:x:0:0").unwrap();
        assert!(AuditLog::open(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "root:x:0:0");
        // A FIFO is refused by name too.
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = AuditLog::open(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn audit_open_accepts_logs_cut_short_by_crashes() {
        // Cut in the first bytes of a record, and a record cut short whose
        // broker then crashed again right after terminating it.
        for tail in ["{\"se", "{\"seq\":9,\"ti", "{\"seq\":9,\"ti\n"] {
            let (_d, path) = write_log(2);
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str(tail);
            std::fs::write(&path, &text).unwrap();
            let mut log = AuditLog::open(&path).unwrap_or_else(|e| panic!("{tail:?}: {e}"));
            log.append(&entry("next")).unwrap();
        }
    }

    #[test]
    fn audit_empty_log_verifies_as_zero_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        AuditLog::open(&path).unwrap();
        assert_eq!(
            check(&path).unwrap(),
            Verified {
                lines: 0,
                head: GENESIS.into(),
                last_seq: None,
                continues: None,
            }
        );
    }

    #[test]
    fn audit_oversized_request_is_logged_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut log = AuditLog::open(&path).unwrap();
        let mut e = entry("big");
        e.request = Some(serde_json::Value::String("x".repeat(MAX_LINE)));
        log.append(&e).unwrap();
        assert_eq!(check(&path).unwrap().lines, 1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("bytes in all"));
        assert!(text.len() < 2 * MAX_FIELD, "{}", text.len());
    }

    #[test]
    fn audit_hostile_path_yields_a_bounded_line_with_length_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut log = AuditLog::open(&path).unwrap();
        let hostile = "\x01".repeat(65_500);
        let mut e = entry(&hostile);
        e.request = Some(serde_json::json!({"Open": {"image": {"kind": "Vhd", "path": hostile}}}));
        e.outcome = Some(hostile.clone());
        e.tenant = Some(hostile.clone());
        let estimate = e.line_len();
        log.append(&e).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Four capped strings of at most MAX_FIELD escaped bytes each.
        assert!(text.len() <= 4 * MAX_FIELD + 1024, "{} bytes", text.len());
        assert!(
            text.len() <= estimate,
            "{} > estimate {estimate}",
            text.len()
        );
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        let p = v["request"]["Open"]["image"]["path"].as_str().unwrap();
        assert!(p.starts_with("\x01\x01"));
        let note = format!(
            "65500 bytes in all, sha256 {}",
            hash_hex(hostile.as_bytes())
        );
        for field in [
            p,
            v["reason"].as_str().unwrap(),
            v["tenant"].as_str().unwrap(),
        ] {
            assert!(field.contains(&note), "{field:.80}");
            assert!(serde_json::to_string(field).unwrap().len() <= MAX_FIELD + 2);
        }
        assert_eq!(check(&path).unwrap().lines, 1);
    }

    #[test]
    fn audit_cap_keeps_short_strings_and_cuts_on_char_boundaries() {
        assert!(matches!(
            cap_str("short"),
            std::borrow::Cow::Borrowed("short")
        ));
        let exact = "a".repeat(MAX_FIELD);
        assert_eq!(cap_str(&exact), exact.as_str());
        let long = "é".repeat(MAX_FIELD);
        let c = cap_str(&long);
        assert!(
            c.len() <= MAX_FIELD && c.contains("bytes in all"),
            "{}",
            c.len()
        );
        // Many small strings in a big array are bounded too.
        let big = serde_json::Value::Array(vec![serde_json::json!("x".repeat(4000)); 1000]);
        let mut e = entry("r");
        e.request = Some(big);
        let b = e.bounded();
        assert!(serde_json::to_vec(&b.request).unwrap().len() <= MAX_REQUEST_JSON);
        assert!(b.request.unwrap()["cut"]
            .as_str()
            .unwrap()
            .contains("sha256"));
    }

    #[test]
    fn audit_kind_only_drops_the_payload() {
        let e = entry("r").kind_only();
        assert_eq!(e.request, Some(serde_json::json!({"kind": "Free"})));
        let mut e = entry("r");
        e.request = Some(serde_json::json!("Spawn"));
        assert_eq!(
            e.kind_only().request,
            Some(serde_json::json!({"kind": "Spawn"}))
        );
    }

    fn rotate(path: &Path, log: &mut AuditLog, to: &str) -> std::path::PathBuf {
        let old = path.with_file_name(to);
        std::fs::rename(path, &old).unwrap();
        let r = log.reopen().unwrap();
        assert_eq!(
            r,
            Reopened::Rotated {
                previous: old.display().to_string()
            }
        );
        old
    }

    fn verify_paths(paths: &[&Path]) -> Result<Vec<(String, Verified)>, BrokenIn> {
        verify_files(paths.iter().map(|p| {
            (
                p.display().to_string(),
                io::BufReader::new(File::open(p).unwrap()),
            )
        }))
    }

    #[test]
    fn audit_rotation_chains_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&entry("one")).unwrap();
        log.append(&entry("two")).unwrap();
        // Nothing renamed: nothing to do.
        assert_eq!(log.reopen().unwrap(), Reopened::Same);
        let f2 = rotate(&path, &mut log, "audit.jsonl.2");
        log.append(&entry("three")).unwrap();
        let f1 = rotate(&path, &mut log, "audit.jsonl.1");
        log.append(&entry("four")).unwrap();
        let old_head = check(&f2).unwrap().head;
        let text = std::fs::read_to_string(&f1).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "rotated");
        assert_eq!(first["prev"], old_head.as_str());
        assert_eq!(first["seq"], 2);
        assert_eq!(first["request"]["previous_file"], f2.to_str().unwrap());
        // In order, the whole chain verifies.
        let all = verify_paths(&[&f2, &f1, &path]).unwrap();
        assert_eq!(
            all.iter().map(|(_, v)| v.lines).collect::<Vec<_>>(),
            [2, 2, 2]
        );
        // Alone, a rotated file verifies and says what it continues.
        let alone = check(&path).unwrap();
        assert_eq!(alone.continues.unwrap().previous_file, f1.to_str().unwrap());
        // A missing file in the middle, or the wrong order, is named.
        let e = verify_paths(&[&f2, &path]).unwrap_err();
        assert_eq!(e.file, path.display().to_string());
        assert_eq!(e.broken.line, 1);
        assert!(e.broken.message.contains("does not continue"), "{e}");
        let e = verify_paths(&[&f1, &f2]).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("{}: chain broken at line 1", f2.display())),
            "{e}"
        );
        // A line appended to the old file after rotation breaks the link.
        let mut t = std::fs::read_to_string(&f2).unwrap();
        let last = t.lines().last().unwrap().to_string();
        t.push_str(&last.replace("two", "TWO"));
        t.push('\n');
        std::fs::write(&f2, t).unwrap();
        let e = verify_paths(&[&f2, &f1, &path]).unwrap_err();
        assert_eq!(e.file, f2.display().to_string(), "{e}");
    }

    #[test]
    fn audit_reopen_after_copytruncate_chains_to_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let copy = dir.path().join("audit.jsonl.1");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&entry("one")).unwrap();
        std::fs::copy(&path, &copy).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(matches!(log.reopen().unwrap(), Reopened::Rotated { .. }));
        log.append(&entry("two")).unwrap();
        let all = verify_paths(&[&copy, &path]).unwrap();
        assert_eq!(all[1].1.lines, 2);
        // Reopened again with lines in it: nothing to do.
        assert_eq!(log.reopen().unwrap(), Reopened::Same);
    }

    #[test]
    fn audit_reopen_refuses_a_new_file_that_already_has_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&entry("one")).unwrap();
        std::fs::rename(&path, dir.path().join("old")).unwrap();
        {
            let mut other = AuditLog::open(&path).unwrap();
            other.append(&entry("someone else's")).unwrap();
        }
        let e = log.reopen().unwrap_err();
        assert!(e.to_string().contains("must start empty"), "{e}");
        // Writing goes on in the old file, chain intact.
        log.append(&entry("two")).unwrap();
        assert_eq!(check(&dir.path().join("old")).unwrap().lines, 2);
        assert_eq!(check(&path).unwrap().lines, 1);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000Z");
    }
}
