//! Which form log lines take, from what stderr is.

/// The three forms of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `tracing_subscriber`'s plain text, for a person at a terminal.
    Human,
    /// One JSON object per line: `level`, `message`, the event's fields,
    /// `target`, and `span` (the request being served, with its fields).
    Json,
    /// Native journald entries (fields `TAPJAIL_MINOR`, `TAPJAIL_PID`, ...).
    Journald,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Human => "human",
            Format::Json => "json",
            Format::Journald => "journald",
        }
    }
}

/// The format for a process whose stderr is (or is not) a terminal and
/// has identity `stderr_id` (device, inode), given `TAPJAIL_LOG_FORMAT`
/// (`forced`) and `JOURNAL_STREAM`. systemd sets `JOURNAL_STREAM` to the
/// `DEV:INODE` of the stream it gave us; a child that inherited the
/// variable but writes elsewhere (a shell redirect) must not log to the
/// journal, hence the comparison. The note says why a forced value was
/// ignored.
pub fn choose_format(
    forced: Option<&str>,
    stderr_tty: bool,
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
) -> (Format, Option<String>) {
    let mut note = None;
    match forced.map(str::trim) {
        Some("human") => return (Format::Human, None),
        Some("json") => return (Format::Json, None),
        Some("journald") => return (Format::Journald, None),
        Some("") | None => {}
        Some(other) => {
            note = Some(format!(
                "{}={:?} is not a log format: use human, json or journald; choosing from what stderr is",
                super::FORMAT_ENV,
                other.chars().take(64).collect::<String>()
            ));
        }
    }
    let journal = journal_stream.and_then(parse_journal_stream);
    let f = if stderr_tty {
        Format::Human
    } else if journal.is_some() && journal == stderr_id {
        Format::Journald
    } else {
        Format::Json
    };
    (f, note)
}

/// `JOURNAL_STREAM`'s `DEV:INODE`, both decimal.
fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}
