//! A small `tracing` subscriber for `tapdisk`, instead of
//! `tracing_subscriber`'s fmt layer and `EnvFilter`.
//!
//! A worker locks all of its memory (`mlockall`), its code included, once
//! per disk: `EnvFilter` (which brings regex engines) and the fmt layer
//! doubled the debug worker's text. This subscriber keeps only what a
//! worker uses: a filter of `LEVEL` and `TARGET=LEVEL` directives (the
//! common subset of `EnvFilter`'s syntax; span and field directives are
//! skipped and said so), no spans, and events written as one line each,
//! with one `write(2)`: JSON (`{"level":"WARN","message":...,fields...,
//! "target":...}`, level first, which the broker's relay reads) or, on a
//! terminal, `LEVEL message key=value`. No clock is read: the broker stamps
//! what it relays, and a worker needs no syscall at event time beyond the
//! write (its seccomp filter allows it).

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// `LEVEL` and `TARGET=LEVEL` directives: the longest matching target
/// prefix decides, else the bare level, else `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeanFilter {
    default: LevelFilter,
    /// (target prefix, level), longest prefix first.
    targets: Vec<(String, LevelFilter)>,
}

fn level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::OFF),
        "error" => Some(LevelFilter::ERROR),
        "warn" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

impl LeanFilter {
    /// Parse `spec`; the directives it could not use are returned, for a
    /// warning (they never stop the worker).
    pub fn parse(spec: &str) -> (LeanFilter, Vec<String>) {
        let mut f = LeanFilter {
            default: LevelFilter::INFO,
            targets: Vec::new(),
        };
        let mut skipped = Vec::new();
        for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.split_once('=') {
                None => match level(d) {
                    Some(l) => f.default = l,
                    None if is_target(d) => f.targets.push((d.to_owned(), LevelFilter::TRACE)),
                    None => skipped.push(d.to_owned()),
                },
                Some((t, l)) => match level(l) {
                    Some(l) if is_target(t) => f.targets.push((t.trim().to_owned(), l)),
                    _ => skipped.push(d.to_owned()),
                },
            }
        }
        f.targets.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        (f, skipped)
    }

    fn max_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| target.starts_with(t.as_str()))
            .map_or(self.default, |(_, l)| *l)
    }

    pub fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.max_for(meta.target())
    }

    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::max)
    }
}

/// A target is a Rust path: no span (`[`) or field (`{`) syntax.
fn is_target(t: &str) -> bool {
    let t = t.trim();
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
}

/// Where [`Lean`] writes: stderr, or a test's buffer.
pub trait LineSink: Send + Sync + 'static {
    fn write_line(&self, line: &[u8]);
}

/// Standard error, one `write_all` (one `write(2)` unless interrupted).
#[derive(Debug, Clone, Copy)]
pub struct Stderr;

impl LineSink for Stderr {
    fn write_line(&self, line: &[u8]) {
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line);
    }
}

/// The subscriber: a filter, a form, a sink.
#[derive(Debug)]
pub struct Lean<S> {
    filter: LeanFilter,
    json: bool,
    sink: S,
}

impl<S: LineSink> Lean<S> {
    pub fn new(filter: LeanFilter, json: bool, sink: S) -> Lean<S> {
        Lean { filter, json, sink }
    }
}

/// `s` as a JSON string: quotes, backslashes and control characters
/// escaped (by hand: serde_json's serializer would add its code to every
/// worker's locked memory).
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Collects an event's fields as `"key":value` JSON pairs or `key=value`.
struct Fields {
    json: bool,
    message: String,
    rest: String,
}

impl Fields {
    fn push(&mut self, field: &Field, json_value: String, text: &dyn std::fmt::Display) {
        if field.name() == "message" {
            self.message = text.to_string();
        } else if self.json {
            let _ = write!(self.rest, ",{}:{json_value}", json_str(field.name()));
        } else {
            let _ = write!(self.rest, " {}={text}", field.name());
        }
    }
}

impl Visit for Fields {
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.push(f, v.to_string(), &v);
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.push(f, v.to_string(), &v);
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.push(f, v.to_string(), &v);
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.push(f, json_str(v), &format_args!("{v:?}"));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        let s = format!("{v:?}");
        self.push(f, json_str(&s), &s);
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

impl<S: LineSink> Lean<S> {
    /// The line for `event`, newline included.
    fn line(&self, event: &Event<'_>) -> String {
        let meta = event.metadata();
        let mut fields = Fields {
            json: self.json,
            message: String::new(),
            rest: String::new(),
        };
        event.record(&mut fields);
        let level = level_name(meta.level());
        let mut line = if self.json {
            format!(
                "{{\"level\":\"{level}\",\"message\":{}{},\"target\":{}}}",
                json_str(&fields.message),
                fields.rest,
                json_str(meta.target())
            )
        } else {
            format!("{level:>5} {}{}", fields.message, fields.rest)
        };
        line.push('\n');
        line
    }
}

impl<S: LineSink> Subscriber for Lean<S> {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        // The filter never changes: decide once per callsite.
        if self.filter.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter.enabled(meta)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Workers log no spans; every span is the same inert one.
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        self.sink.write_line(self.line(event).as_bytes());
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}
