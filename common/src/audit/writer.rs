//! Appending to the log: one locked file, a line written and made durable
//! before the broker replies, rotation that carries the chain over.

use super::{hash_hex, rfc3339, AuditError, Entry, Event, Line, Verdict, GENESIS, MAX_LINE};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// An append-only, hash-chained, fsync'd log file, locked against a second
/// writer.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
    prev: String,
    seq: u64,
}

/// What [`AuditLog::reopen`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopened {
    /// The path still names the file being written: nothing to do.
    Same,
    /// A new file was started; its first line chains to `previous`.
    Rotated { previous: String },
}

impl AuditLog {
    /// Open (creating, mode 0600) and lock `path`, continuing the chain from
    /// its last line.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let (mut file, tail) = open_locked(path)?;
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
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            prev,
            seq,
        })
    }

    /// Reopen the log's path after it was rotated (logrotate renamed the
    /// file and the broker got SIGHUP). The new file's first line is a
    /// [`Event::Rotated`] line whose `prev` is the old file's last hash
    /// and which names the old file (as it is called now), so the chain
    /// runs on across files (`tap-ctl audit verify OLD NEW`). A path that
    /// still names the current file is left alone; a new file that
    /// already holds lines is refused (its chain would fork) and writing
    /// continues in the old one.
    pub fn reopen(&mut self) -> Result<Reopened, AuditError> {
        use std::os::unix::fs::MetadataExt;
        let cur = self.file.metadata().map_err(AuditError::Write)?;
        let shown = self.path.display().to_string();
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == cur.dev() && m.ino() == cur.ino() {
                if cur.len() > 0 || self.prev == GENESIS {
                    return Ok(Reopened::Same);
                }
                // Emptied in place (logrotate's `copytruncate`): start the
                // file with the same link to what it held before.
                let previous = format!("{shown} as it was before it was truncated (copytruncate)");
                self.append(&rotated_entry(&previous, &self.prev, self.seq))?;
                return Ok(Reopened::Rotated { previous });
            }
        }
        let (file, tail) = open_locked(&self.path)?;
        if !matches!(tail, Tail::Empty) {
            return Err(AuditError::NotAuditLog {
                path: shown,
                why: "it already holds lines, and a rotated log must start empty to continue the chain".into(),
            });
        }
        let previous = std::fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .map_or_else(
                |_| format!("{shown} (before rotation)"),
                |p| p.display().to_string(),
            );
        let old = std::mem::replace(&mut self.file, file);
        if let Err(e) = self.append(&rotated_entry(&previous, &self.prev, self.seq)) {
            // Keep writing where the chain is intact.
            let new = std::mem::replace(&mut self.file, old);
            let _ = new.set_len(0);
            return Err(e);
        }
        drop(old);
        Ok(Reopened::Rotated { previous })
    }

    /// The path the log is written at.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The first line of a reopened log: `append` sets its `prev` (the
/// chain); the line records that hash too, with the previous file's name.
pub(super) fn rotated_entry(previous: &str, last_hash: &str, next_seq: u64) -> Entry {
    Entry {
        event: Event::Rotated,
        peer: None,
        tenant: None,
        request: Some(serde_json::json!({
            "previous_file": previous,
            "previous_last_hash": last_hash,
            "previous_last_seq": next_seq.checked_sub(1),
        })),
        decision: Verdict::Notice,
        rule: "rotate".into(),
        reason: format!("audit log reopened (SIGHUP); this file continues the chain of {previous}"),
        outcome: None,
    }
}

/// Open (creating, mode 0600) and flock `path`, and read its last line.
pub(super) fn open_locked(path: &Path) -> Result<(File, Tail), AuditError> {
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
    Ok((file, tail))
}

impl AuditLog {
    /// Append `entry` as one line and make it durable before returning.
    /// On failure the file is truncated back so the chain stays intact.
    pub fn append(&mut self, entry: &Entry) -> Result<(), AuditError> {
        self.write_line(entry, true)
    }

    /// Append `entry` as one line without waiting for the disk: the caller
    /// makes it durable (`sync_data` on [`AuditLog::sync_handle`]) before
    /// acting on it or acknowledging it. Lets concurrent requests share
    /// one fsync (the broker's group commit). On a failed write the file
    /// is truncated back, as with [`AuditLog::append`].
    pub fn append_unsynced(&mut self, entry: &Entry) -> Result<(), AuditError> {
        self.write_line(entry, false)
    }

    /// Another handle on the file being written, to fsync it without
    /// holding the log (a rotation changes the file: take a new one then).
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    fn write_line(&mut self, entry: &Entry, sync: bool) -> Result<(), AuditError> {
        let entry = &entry.bounded();
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
            return self.write_line(&slim, sync);
        }
        let hash = hash_hex(&bytes);
        bytes.push(b'\n');
        let before = self.file.metadata().map_err(AuditError::Write)?.len();
        let res =
            self.file
                .write_all(&bytes)
                .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
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

pub(super) enum Tail {
    Empty,
    Complete(Vec<u8>),
    Partial(Vec<u8>),
}

/// The last line of `file` (without newline), reading backwards at most
/// [`MAX_LINE`] bytes.
/// Whether `line` is (or is the start of) a line we write: they all
/// begin with `{"seq":`. A crash can cut one anywhere, and a cut line is
/// terminated at the next start, so a prefix counts too.
pub(super) fn looks_like_a_record(line: &[u8]) -> bool {
    const START: &[u8] = b"{\"seq\":";
    line.starts_with(START) || (!line.is_empty() && START.starts_with(line))
}

pub(super) fn read_last_line(file: &mut File) -> io::Result<Tail> {
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

pub(super) fn last_seq(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("seq")?.as_u64()
}
