use super::*;
use std::io;
use std::sync::{Arc, Mutex};

/// Collects what a subscriber writes, and how many writes it took.
#[derive(Clone, Default)]
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    writes: Arc<Mutex<usize>>,
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.lock().unwrap().extend_from_slice(buf);
        *self.writes.lock().unwrap() += 1;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
    }
    fn writes(&self) -> usize {
        *self.writes.lock().unwrap()
    }
    fn json(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn run(format: Format, program: Program, filter: &str, f: impl FnOnce()) -> Capture {
    let cap = Capture::default();
    let sub = test_subscriber(format, program, EnvFilter::new(filter), cap.clone());
    tracing::subscriber::with_default(sub, f);
    cap
}

fn a_request() {
    let span = tracing::info_span!("request", op = "open", id = 7u64, tenant = "alice");
    let _g = span.enter();
    tracing::info!(
        minor = 3u32,
        pid = 77u32,
        image = "/img/a.vhd",
        "image opened"
    );
    tracing::debug!(minor = 3u32, "a detail");
    tracing::warn!(minor = 3u32, "line one\nline two");
}

#[test]
fn json_lines_parse_and_carry_the_fields_and_the_request() {
    let cap = run(Format::Json, Program::Daemon, "info", a_request);
    let events = cap.json();
    assert_eq!(events.len(), 2, "{}", cap.text());
    let e = &events[0];
    assert_eq!(e["level"], "INFO");
    assert_eq!(e["message"], "image opened");
    assert_eq!(e["minor"], 3);
    assert_eq!(e["pid"], 77);
    assert_eq!(e["image"], "/img/a.vhd");
    assert_eq!(e["span"]["name"], "request");
    assert_eq!(e["span"]["op"], "open");
    assert_eq!(e["span"]["id"], 7);
    assert_eq!(e["span"]["tenant"], "alice");
    assert!(e["timestamp"].is_string(), "{e}");
    // A newline in a message stays inside its JSON string.
    assert_eq!(events[1]["level"], "WARN");
    assert_eq!(events[1]["message"], "line one\nline two");
}

#[test]
fn every_event_is_one_write() {
    let cap = run(Format::Json, Program::Daemon, "trace", a_request);
    assert_eq!(cap.writes(), 3, "{}", cap.text());
    let cap = run(Format::Human, Program::Daemon, "trace", a_request);
    assert_eq!(cap.writes(), 3, "{}", cap.text());
}

#[test]
fn human_lines_are_plain_text_with_the_fields() {
    let cap = run(Format::Human, Program::Daemon, "info", a_request);
    let text = cap.text();
    let first = text.lines().next().unwrap();
    assert!(!first.starts_with('{'), "{first}");
    assert!(first.contains(" INFO "), "{first}");
    assert!(
        first.contains("request{op=\"open\" id=7 tenant=\"alice\"}"),
        "{first}"
    );
    assert!(
        first.contains("image opened minor=3 pid=77 image=\"/img/a.vhd\""),
        "{first}"
    );
    assert!(!text.contains('\x1b'), "no colour codes: {text:?}");
    // A tool's lines carry neither time nor target.
    let cap = run(Format::Human, Program::Tool, "info", || {
        tracing::warn!("block size 4096 is unusual")
    });
    assert_eq!(cap.text(), " WARN block size 4096 is unusual\n");
}

#[test]
fn worker_lines_are_json_starting_with_the_level_and_without_time() {
    // The broker reads a relayed line's level from its first bytes.
    let cap = run(Format::Json, Program::Worker, "info", a_request);
    let text = cap.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with(r#"{"level":"INFO","#), "{}", lines[0]);
    assert!(lines[1].starts_with(r#"{"level":"WARN","#), "{}", lines[1]);
    assert!(!text.contains("timestamp"), "{text}");
}

#[test]
fn the_filter_shows_what_it_names_and_nothing_else() {
    let c = parse_filter(Some("warn"), None);
    assert!(c.warning.is_none());
    let cap = run(Format::Json, Program::Daemon, &c.text, a_request);
    let levels: Vec<_> = cap.json().iter().map(|e| e["level"].clone()).collect();
    assert_eq!(levels, vec!["WARN"]);
    let cap = run(Format::Json, Program::Daemon, "debug", a_request);
    assert_eq!(cap.json().len(), 3);
    // By target: this crate's events at debug, everything else off.
    let cap = run(
        Format::Json,
        Program::Daemon,
        "off,tapjail_common=debug",
        a_request,
    );
    assert_eq!(cap.json().len(), 3);
    let cap = run(
        Format::Json,
        Program::Daemon,
        "tap_broker=trace,error",
        a_request,
    );
    assert_eq!(cap.json().len(), 0);
}

#[test]
fn tapjail_log_wins_over_rust_log_and_empty_counts_as_unset() {
    assert_eq!(parse_filter(Some("debug"), Some("error")).text, "debug");
    assert_eq!(parse_filter(None, Some("error")).text, "error");
    assert_eq!(parse_filter(Some(" "), Some("error")).text, "error");
    assert_eq!(parse_filter(None, None).text, DEFAULT_FILTER);
}

#[test]
fn a_bad_filter_is_named_and_the_default_used() {
    let c = parse_filter(Some("tap_broker=loud"), Some("debug"));
    assert_eq!(c.text, "info");
    let w = c.warning.unwrap();
    assert!(
        w.starts_with("TAPJAIL_LOG=\"tap_broker=loud\" is not a log filter"),
        "{w}"
    );
    assert!(w.contains("using \"info\""), "{w}");
    let c = parse_filter(None, Some("[\x1b]=x"));
    assert_eq!(c.text, "info");
    let w = c.warning.unwrap();
    assert!(w.starts_with("RUST_LOG="), "{w}");
    assert!(!w.contains('\x1b'), "{w:?}");
}

proptest::proptest! {
    #[test]
    fn no_filter_string_panics(s in "\\PC{0,40}") {
        let c = parse_filter(Some(&s), None);
        // Whatever was chosen is itself a filter that parses.
        proptest::prop_assert!(EnvFilter::builder().parse(&c.text).is_ok());
    }
}

#[test]
fn the_format_follows_what_stderr_is() {
    let id = Some((64770, 1234));
    assert_eq!(choose_format(None, true, None, id).0, Format::Human);
    assert_eq!(choose_format(None, false, None, id).0, Format::Json);
    assert_eq!(
        choose_format(None, false, Some("64770:1234"), id).0,
        Format::Journald
    );
    // Inherited JOURNAL_STREAM, but stderr is now elsewhere: JSON.
    assert_eq!(
        choose_format(None, false, Some("64770:999"), id).0,
        Format::Json
    );
    assert_eq!(choose_format(None, false, Some("junk"), id).0, Format::Json);
    // A terminal wins over the journal (systemd-run --pty).
    assert_eq!(
        choose_format(None, true, Some("64770:1234"), id).0,
        Format::Human
    );
    assert_eq!(choose_format(Some("json"), true, None, id).0, Format::Json);
    assert_eq!(
        choose_format(Some("human"), false, None, id).0,
        Format::Human
    );
    let (f, note) = choose_format(Some("xml"), false, None, id);
    assert_eq!(f, Format::Json);
    assert!(note
        .unwrap()
        .contains("TAPJAIL_LOG_FORMAT=\"xml\" is not a log format"));
}

#[test]
fn log_line_is_an_info_event_under_a_subscriber() {
    let cap = run(Format::Json, Program::Daemon, "info", || {
        crate::log_line!("tap-broker: legacy line {}", 42);
    });
    let e = &cap.json()[0];
    assert_eq!(e["level"], "INFO");
    assert_eq!(e["message"], "tap-broker: legacy line 42");
    assert_eq!(cap.writes(), 1);
}

mod lean_tests {
    use super::super::lean::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);
    impl LineSink for Lines {
        fn write_line(&self, line: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8(line.to_vec()).unwrap());
        }
    }

    fn run(spec: &str, json: bool, f: impl FnOnce()) -> Vec<String> {
        let lines = Lines::default();
        let (filter, _) = LeanFilter::parse(spec);
        tracing::subscriber::with_default(Lean::new(filter, json, lines.clone()), f);
        let v = lines.0.lock().unwrap().clone();
        v
    }

    #[test]
    fn lean_json_lines_start_with_the_level_and_carry_the_fields() {
        let lines = run("debug", true, || {
            tracing::warn!(
                minor = 3u16,
                image = "a \"b\"\n.vhd",
                ok = true,
                "it \"broke\"\nhere"
            );
            tracing::debug!(n = -4i64, "detail");
            tracing::trace!("hidden");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with(r#"{"level":"WARN","#), "{}", lines[0]);
        assert!(lines
            .iter()
            .all(|l| l.ends_with('\n') && l.matches('\n').count() == 1));
        let e: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(e["message"], "it \"broke\"\nhere");
        assert_eq!(e["minor"], 3);
        assert_eq!(e["image"], "a \"b\"\n.vhd");
        assert_eq!(e["ok"], true);
        assert_eq!(e["target"], module_path!());
        let e: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(e["level"], "DEBUG");
        assert_eq!(e["n"], -4);
    }

    #[test]
    fn lean_plain_lines_on_a_terminal() {
        let lines = run("info", false, || tracing::warn!(minor = 3u16, "disk full"));
        assert_eq!(lines, vec![" WARN disk full minor=3\n".to_string()]);
    }

    #[test]
    fn lean_filter_takes_levels_and_targets_and_skips_the_rest() {
        let (f, skipped) = LeanFilter::parse("warn,tapjail_common=trace,x[span]=debug,loud");
        assert_eq!(skipped, vec!["x[span]=debug".to_string()]);
        let lines = run("warn,tapjail_common::logging=trace", true, || {
            tracing::trace!("mine")
        });
        assert_eq!(lines.len(), 1);
        let lines = run("trace,tapjail_common=off", true, || tracing::error!("mine"));
        assert!(lines.is_empty());
        let lines = run("error", true, || tracing::warn!("mine"));
        assert!(lines.is_empty());
        // A bare target means everything from it (as in EnvFilter).
        let (f2, _) = LeanFilter::parse("off,tapjail_common");
        assert_ne!(f, f2);
        let lines = run("off,tapjail_common", true, || tracing::trace!("mine"));
        assert_eq!(lines.len(), 1);
    }
}

proptest::proptest! {
    #[test]
    fn lean_json_strings_parse_back_to_the_same_text(s in "\\PC*|[\\x00-\\x7f]*") {
        let j = lean::json_str(&s);
        let back: String = serde_json::from_str(&j).unwrap();
        proptest::prop_assert_eq!(back, s);
        proptest::prop_assert!(!j.contains('\n'));
    }
}
