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
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// A worker, minor or kept fd left by a previous broker was taken
    /// over, or refused (and why).
    Adopt,
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

/// An append-only, hash-chained, fsync'd log file, locked against a second
/// writer.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    prev: String,
    seq: u64,
}

impl AuditLog {
    /// Open (creating, mode 0600) and lock `path`, continuing the chain from
    /// its last line.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let shown = path.display().to_string();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: shown.clone(),
                source,
            })?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                AuditError::Locked(shown)
            } else {
                AuditError::Open {
                    path: shown,
                    source: e,
                }
            });
        }
        let meta = file.metadata().map_err(|source| AuditError::Open {
            path: shown.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(AuditError::NotAuditLog {
                path: shown,
                why: "not a regular file".into(),
            });
        }
        let tail = read_last_line(&mut file).map_err(|source| AuditError::Tail {
            path: shown.clone(),
            source,
        })?;
        if let Tail::Complete(line) | Tail::Partial(line) = &tail {
            if !looks_like_a_record(line) {
                return Err(AuditError::NotAuditLog {
                    path: shown,
                    why: "its last line is not an audit record".into(),
                });
            }
        }
        let (prev, seq) = match tail {
            Tail::Empty => (GENESIS.to_string(), 0),
            Tail::Complete(line) => (hash_hex(&line), last_seq(&line).map_or(0, |s| s + 1)),
            Tail::Partial(line) => {
                // A crash cut the last line short. Terminate it so the next
                // line starts cleanly; `verify` will report it as broken,
                // which is the truth.
                file.write_all(b"\n").map_err(AuditError::Write)?;
                (hash_hex(&line), 0)
            }
        };
        Ok(AuditLog { file, prev, seq })
    }

    /// Append `entry` as one line and make it durable before returning.
    /// On failure the file is truncated back so the chain stays intact.
    pub fn append(&mut self, entry: &Entry) -> Result<(), AuditError> {
        let line = Line {
            seq: self.seq,
            time: rfc3339(SystemTime::now()),
            entry,
            prev: &self.prev,
        };
        let mut bytes = serde_json::to_vec(&line)?;
        if bytes.len() > MAX_LINE {
            // Keep the record but drop the oversized request body.
            let mut slim = entry.clone();
            slim.request = Some(serde_json::Value::String(
                "<request too large to log>".into(),
            ));
            return self.append(&slim);
        }
        let hash = hash_hex(&bytes);
        bytes.push(b'\n');
        let before = self.file.metadata().map_err(AuditError::Write)?.len();
        let res = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            let _ = self.file.set_len(before);
            return Err(AuditError::Write(e));
        }
        self.prev = hash;
        self.seq += 1;
        Ok(())
    }

    /// Hash of the last line written (what the next line's `prev` will be).
    pub fn head(&self) -> &str {
        &self.prev
    }
}

enum Tail {
    Empty,
    Complete(Vec<u8>),
    Partial(Vec<u8>),
}

/// The last line of `file` (without newline), reading backwards at most
/// [`MAX_LINE`] bytes.
/// Whether `line` is (or is the start of) a line we write: they all
/// begin with `{"seq":`. A crash can cut one anywhere, and a cut line is
/// terminated at the next start, so a prefix counts too.
fn looks_like_a_record(line: &[u8]) -> bool {
    const START: &[u8] = b"{\"seq\":";
    line.starts_with(START) || (!line.is_empty() && START.starts_with(line))
}

fn read_last_line(file: &mut File) -> io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let want = len.min(MAX_LINE as u64 + 1);
    let start = len - want;
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(MAX_LINE));
    Read::by_ref(file).take(want).read_to_end(&mut buf)?;
    let complete = buf.last() == Some(&b'\n');
    let body = if complete {
        &buf[..buf.len() - 1]
    } else {
        &buf[..]
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(p) => body[p + 1..].to_vec(),
        None if start == 0 => body.to_vec(),
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("last line is longer than {MAX_LINE} bytes"),
            ))
        }
    };
    Ok(if complete {
        Tail::Complete(line)
    } else {
        Tail::Partial(line)
    })
}

fn last_seq(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("seq")?.as_u64()
}

/// Result of a successful [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub lines: u64,
    /// Hash of the last line (GENESIS for an empty log).
    pub head: String,
}

/// The first line at which the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Broken {
    /// 1-based.
    pub line: u64,
    pub message: String,
}

/// Check every line's `prev` against the hash of the line before it.
pub fn verify<R: BufRead>(mut reader: R) -> Result<Verified, Broken> {
    let mut expected = GENESIS.to_string();
    let mut prev_seq: Option<u64> = None;
    let mut n: u64 = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let got = (&mut reader)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Broken {
                line: n + 1,
                message: format!("read error: {e}"),
            })?;
        if got == 0 {
            return Ok(Verified {
                lines: n,
                head: expected,
            });
        }
        n += 1;
        let broken = |message: String| Broken { line: n, message };
        if buf.last() != Some(&b'\n') {
            return Err(broken(if buf.len() > MAX_LINE {
                format!("longer than {MAX_LINE} bytes")
            } else {
                "incomplete: no trailing newline (write cut short, or truncated)".into()
            }));
        }
        let line = &buf[..buf.len() - 1];
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| broken(format!("not a valid JSON line ({e}): altered or corrupt")))?;
        let prev = v
            .get("prev")
            .and_then(|p| p.as_str())
            .ok_or_else(|| broken("has no \"prev\" field".into()))?;
        if prev != expected {
            return Err(broken(if n == 1 {
                format!(
                    "prev is {prev}, but the first line of a log must have the genesis hash: lines were removed from the start"
                )
            } else {
                format!(
                    "prev is {prev}, but SHA-256 of line {} is {expected}: line {} was altered, or lines were removed or inserted before line {n}",
                    n - 1,
                    n - 1
                )
            }));
        }
        let seq = v.get("seq").and_then(|s| s.as_u64());
        if let (Some(p), Some(s)) = (prev_seq, seq) {
            // A broker restart may continue any chain, but seq never goes back.
            if s <= p {
                return Err(broken(format!(
                    "seq {s} does not follow seq {p} of line {}",
                    n - 1
                )));
            }
        }
        prev_seq = seq.or(prev_seq);
        expected = hash_hex(line);
    }
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
                head: GENESIS.into()
            }
        );
    }

    #[test]
    fn audit_oversized_request_is_logged_without_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut log = AuditLog::open(&path).unwrap();
        let mut e = entry("big");
        e.request = Some(serde_json::Value::String("x".repeat(MAX_LINE)));
        log.append(&e).unwrap();
        assert_eq!(check(&path).unwrap().lines, 1);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("too large"));
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
