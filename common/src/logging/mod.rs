//! The one place every tapjail program sets up its `tracing` subscriber.
//!
//! Where the lines go decides their form: a terminal gets human-readable
//! lines, journald (when `JOURNAL_STREAM` names our stderr, as systemd sets
//! it) gets native entries with each field its own journal field, and
//! anything else (a file, a pipe, the broker reading a worker) gets one JSON
//! object per line, which `jq` and log shippers read without guessing.
//! `TAPJAIL_LOG_FORMAT=human|json|journald` overrides the choice.
//!
//! What is shown follows `TAPJAIL_LOG` (else `RUST_LOG`, else `info`) in
//! `tracing_subscriber::EnvFilter` syntax; a filter that does not parse is
//! reported and replaced by the default instead of stopping the program.
//!
//! Every line is formatted whole and written to stderr with one `write(2)`
//! (the fmt layer formats into a buffer and writes it at once), so lines of
//! several threads never interleave (see [`crate::log_line!`]).

mod filter;
mod format;
pub mod lean;

pub use filter::{parse_filter, FilterChoice, DEFAULT_FILTER};
pub use format::{choose_format, Format};

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::OnceLock;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The filter variable read first.
pub const FILTER_ENV: &str = "TAPJAIL_LOG";
/// The filter variable read when [`FILTER_ENV`] is unset (the Rust habit).
pub const RUST_LOG_ENV: &str = "RUST_LOG";
/// Forces a format (`human`, `json`, `journald`) whatever stderr is.
pub const FORMAT_ENV: &str = "TAPJAIL_LOG_FORMAT";
/// What systemd sets to `DEV:INODE` of the stream it connected to stderr.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";

/// Who is logging: it decides the human form and the worker's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// A daemon (`tap-broker`): timestamps and targets on every line.
    Daemon,
    /// A command (`tap-ctl`, `tapdisk` run by hand): no timestamp, no
    /// target; an operator reads it as the command's own messages.
    Tool,
    /// A worker under the broker: JSON lines without timestamps (the broker
    /// stamps what it relays), whatever the environment says.
    Worker,
}

/// What [`init`] set up, for the program to mention if it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub format: Format,
    /// The filter in force, in `EnvFilter` syntax (what a worker is given).
    pub filter: String,
}

static EFFECTIVE_FILTER: OnceLock<String> = OnceLock::new();

/// The filter this process logs with, for a child that should log the
/// same way (the broker passes it to each worker as [`FILTER_ENV`], the one
/// variable of a worker's otherwise empty environment).
pub fn effective_filter() -> &'static str {
    EFFECTIVE_FILTER
        .get()
        .map(String::as_str)
        .unwrap_or(DEFAULT_FILTER)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Device and inode of our stderr, to compare with `JOURNAL_STREAM`.
fn stderr_identity() -> Option<(u64, u64)> {
    let st = crate::sys::fstat(std::io::stderr().as_fd()).ok()?;
    Some((st.dev, st.ino))
}

/// Install the global subscriber for `program`, reading the environment.
/// Problems (a bad filter, journald unreachable) are logged as warnings
/// through the subscriber just installed. Calling it twice keeps the first.
pub fn init(program: Program) -> Chosen {
    let stderr = std::io::stderr();
    let mut notes = Vec::new();
    let format = match program {
        Program::Worker => Format::Json,
        _ => {
            let (f, note) = choose_format(
                env(FORMAT_ENV).as_deref(),
                stderr.is_terminal(),
                env(JOURNAL_STREAM_ENV).as_deref(),
                stderr_identity(),
            );
            notes.extend(note);
            f
        }
    };
    let choice = parse_filter(env(FILTER_ENV).as_deref(), env(RUST_LOG_ENV).as_deref());
    notes.extend(choice.warning.clone());
    let (layer, format) = match format {
        Format::Journald => match journald_layer() {
            Ok(l) => (l, Format::Journald),
            Err(e) => {
                notes.push(format!(
                    "journald: {e}; writing JSON lines to stderr instead \
                     (unset {JOURNAL_STREAM_ENV} or set {FORMAT_ENV}=json to silence this)"
                ));
                (
                    fmt_layer(Format::Json, program, std::io::stderr),
                    Format::Json,
                )
            }
        },
        f => (fmt_layer(f, program, std::io::stderr), f),
    };
    let subscriber = Registry::default().with(layer.with_filter(choice.filter));
    let installed = tracing::subscriber::set_global_default(subscriber).is_ok();
    if installed {
        let _ = EFFECTIVE_FILTER.set(choice.text.clone());
        for n in notes {
            tracing::warn!("{n}");
        }
    }
    Chosen {
        format,
        filter: choice.text,
    }
}

/// Whether a subscriber (global or this thread's) takes events; without
/// one, [`crate::log_line!`] writes its line to stderr itself.
pub fn subscribed() -> bool {
    tracing::dispatcher::get_default(|d| !d.is::<tracing::subscriber::NoSubscriber>())
}

/// [`init`] for `tapdisk`, with the [`lean`] subscriber (see there why):
/// a worker under the broker (and its selftest) writes JSON lines; the
/// standalone monitor writes plain lines on a terminal and JSON lines
/// otherwise (no journald: run it under a broker for that).
pub fn init_lean(program: Program) -> Chosen {
    let spec = env(FILTER_ENV)
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env(RUST_LOG_ENV))
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let (filter, skipped) = lean::LeanFilter::parse(&spec);
    let format = if program != Program::Worker && std::io::stderr().is_terminal() {
        Format::Human
    } else {
        Format::Json
    };
    let sub = lean::Lean::new(filter, format == Format::Json, lean::Stderr);
    if tracing::subscriber::set_global_default(sub).is_ok() {
        let _ = EFFECTIVE_FILTER.set(spec.clone());
        if !skipped.is_empty() {
            tracing::warn!(
                "log filter {spec:?}: tapdisk understands only LEVEL and TARGET=LEVEL directives; \
                 ignored {skipped:?}"
            );
        }
    }
    Chosen {
        format,
        filter: spec,
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn journald_layer() -> std::io::Result<BoxedLayer> {
    // Fields become `TAPJAIL_MINOR=3`, `TAPJAIL_TENANT=alice`, ... so that
    // `journalctl TAPJAIL_MINOR=3` finds one disk's lines.
    let l = tracing_journald::layer()?.with_field_prefix(Some("TAPJAIL".into()));
    Ok(Box::new(l))
}

/// The fmt layer for `format` (not journald) writing to `writer`: public so
/// that tests (ours and the binaries') check the very lines programs write.
pub fn fmt_layer<W>(format: Format, program: Program, writer: W) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::layer().with_writer(writer);
    match (format, program) {
        (Format::Human, Program::Daemon) => Box::new(base.with_ansi(false)),
        (Format::Human, _) => Box::new(base.with_ansi(false).without_time().with_target(false)),
        (_, Program::Worker) => Box::new(
            base.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .without_time(),
        ),
        _ => Box::new(
            base.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false),
        ),
    }
}

/// A subscriber like [`init`]'s, writing to `writer`, for
/// `tracing::subscriber::with_default` in tests.
pub fn test_subscriber<W>(
    format: Format,
    program: Program,
    filter: EnvFilter,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    Registry::default().with(fmt_layer(format, program, writer).with_filter(filter))
}

#[cfg(test)]
mod tests;
