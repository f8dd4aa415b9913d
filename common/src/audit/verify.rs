//! `tap-ctl audit verify`: the hash chain checked line by line, across
//! rotated files.

use super::{hash_hex, GENESIS, MAX_LINE};
use std::io::{BufRead, Read};

/// Result of a successful [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub lines: u64,
    /// Hash of the last line (the chain's start hash for an empty log).
    pub head: String,
    /// `seq` of the last line, if any line had one.
    pub last_seq: Option<u64>,
    /// Set when the file starts with a [`Event::Rotated`] line: the file
    /// it says it continues (checked only if that file is verified with
    /// it, [`verify_files`]).
    pub continues: Option<Continuation>,
}

/// What a log's first `rotated` line says about the file before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub previous_file: String,
    pub previous_last_hash: String,
}

/// The first line at which the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Broken {
    /// 1-based.
    pub line: u64,
    pub message: String,
}

/// Check every line's `prev` against the hash of the line before it. The
/// first line must carry the genesis hash, unless it is a `rotated` line
/// (the file continues a rotated-away one; see [`Verified::continues`]).
pub fn verify<R: BufRead>(reader: R) -> Result<Verified, Broken> {
    verify_after(reader, None)
}

/// Where the previous file of a rotated series left the chain.
#[derive(Debug, Clone)]
pub(super) struct After<'a> {
    name: &'a str,
    head: &'a str,
    last_seq: Option<u64>,
}

pub(super) fn verify_after<R: BufRead>(
    mut reader: R,
    after: Option<After<'_>>,
) -> Result<Verified, Broken> {
    let mut expected = after.as_ref().map_or(GENESIS, |a| a.head).to_string();
    let mut prev_seq: Option<u64> = after.as_ref().and_then(|a| a.last_seq);
    let mut continues = None;
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
                last_seq: prev_seq,
                continues,
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
        let rotated = v.get("event").and_then(|e| e.as_str()) == Some("rotated");
        if n == 1 && rotated {
            let recorded = v
                .pointer("/request/previous_last_hash")
                .and_then(|h| h.as_str());
            if recorded != Some(prev) {
                return Err(broken(format!(
                    "a rotated line whose prev ({prev}) differs from the hash it records ({}): altered",
                    recorded.unwrap_or("none")
                )));
            }
            let previous_file = v
                .pointer("/request/previous_file")
                .and_then(|f| f.as_str())
                .unwrap_or("?")
                .to_string();
            if after.is_none() {
                // The first file given: where it came from is not checked.
                expected = prev.to_string();
            }
            continues = Some(Continuation {
                previous_file,
                previous_last_hash: prev.to_string(),
            });
        }
        if prev != expected {
            return Err(broken(match (&after, n) {
                (None, 1) => format!(
                    "prev is {prev}, but the first line of a log must have the genesis hash (or be a `rotated` line): lines were removed from the start"
                ),
                (Some(a), 1) => format!(
                    "prev is {prev}, but the last line of {} hashes to {expected}: this file does not continue that one (files out of order, a rotated file missing between them, or {} altered or extended after rotation)",
                    a.name, a.name
                ),
                _ => format!(
                    "prev is {prev}, but SHA-256 of line {} is {expected}: line {} was altered, or lines were removed or inserted before line {n}",
                    n - 1,
                    n - 1
                ),
            }));
        }
        let seq = v.get("seq").and_then(|s| s.as_u64());
        if let (Some(p), Some(s)) = (prev_seq, seq) {
            // A broker restart may continue any chain, but seq never goes back.
            if s <= p {
                return Err(broken(format!(
                    "seq {s} does not follow seq {p} of {}",
                    if n == 1 {
                        after.as_ref().map_or("the line before".to_string(), |a| {
                            format!("the last line of {}", a.name)
                        })
                    } else {
                        format!("line {}", n - 1)
                    }
                )));
            }
        }
        prev_seq = seq.or(prev_seq);
        expected = hash_hex(line);
    }
}

/// A break in a series of files, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: chain broken at {broken}")]
pub struct BrokenIn {
    pub file: String,
    pub broken: Broken,
}

/// Verify rotated files given oldest first: each file's chain, and that
/// each file after the first starts where the one before it ended (its
/// first line's `prev` is the previous file's last hash). Returns each
/// file's result in order.
pub fn verify_files<R: BufRead>(
    files: impl IntoIterator<Item = (String, R)>,
) -> Result<Vec<(String, Verified)>, BrokenIn> {
    let mut done: Vec<(String, Verified)> = Vec::new();
    for (name, reader) in files {
        let after = done.last().map(|(n, v)| After {
            name: n,
            head: &v.head,
            last_seq: v.last_seq,
        });
        match verify_after(reader, after) {
            Ok(v) => done.push((name, v)),
            Err(broken) => return Err(BrokenIn { file: name, broken }),
        }
    }
    Ok(done)
}
