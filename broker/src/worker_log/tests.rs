use super::*;
use std::sync::Arc;
use tapjail_common::logging::{test_subscriber, Format, Program};
use tracing_subscriber::EnvFilter;

fn run(filter: &mut LineFilter, bytes: &[u8], now: Instant) -> Vec<Relayed> {
    let mut out = Vec::new();
    filter.feed(bytes, now, &mut |r| out.push(r));
    out
}

fn line(text: &str) -> Relayed {
    Relayed::Line {
        text: text.into(),
        cut: 0,
    }
}

/// The broker's own JSON lines for what `f` logs.
fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
    let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
    let b = buf.clone();
    let writer = move || Writer(b.clone());
    let sub = test_subscriber(
        Format::Json,
        Program::Daemon,
        EnvFilter::new("trace"),
        writer,
    );
    tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

struct Writer(Arc<Mutex<Vec<u8>>>);
impl io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn escape_leaves_no_control_byte() {
    let e = escape(b"a\x1b[2J\rb\\\xff\x07");
    assert_eq!(e, "a\\x1b[2J\\x0db\\\\\\xff\\x07");
    assert!(e.bytes().all(|b| (0x20..0x7f).contains(&b)));
}

#[test]
fn lines_are_escaped_and_cut() {
    let mut f = LineFilter::new();
    let now = Instant::now();
    let mut bytes = b"hello \x1b]0;owned\x07\n".to_vec();
    bytes.extend(vec![b'x'; 10_000]);
    bytes.push(b'\n');
    let lines = run(&mut f, &bytes, now);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], line("hello \\x1b]0;owned\\x07"));
    let Relayed::Line { text, cut } = &lines[1] else {
        panic!("{lines:?}")
    };
    assert_eq!(*cut, 10_000 - MAX_LINE);
    assert!(text.starts_with("xxxx"));
    assert!(text.ends_with(&format!("... ({} more bytes cut)", 10_000 - MAX_LINE)));
    assert!(text.len() < MAX_LINE + 100);
}

#[test]
fn a_flood_is_cut_to_the_burst_and_the_drop_is_counted() {
    let mut f = LineFilter::new();
    let t0 = Instant::now();
    let flood = b"spam\n".repeat(10_000);
    let lines = run(&mut f, &flood, t0);
    assert_eq!(lines.len(), BURST as usize);
    // Quiet for a second: the count is written, then lines flow again.
    let mut later = Vec::new();
    f.tick(t0 + Duration::from_secs(1), &mut |l| later.push(l));
    assert_eq!(later, vec![Relayed::Dropped(u64::from(10_000 - BURST))]);
    let more = run(&mut f, b"again\n", t0 + Duration::from_secs(1));
    assert_eq!(more, vec![line("again")]);
}

#[test]
fn finish_writes_the_unterminated_line_and_the_count() {
    let mut f = LineFilter::new();
    let t0 = Instant::now();
    let _ = run(&mut f, &b"x\n".repeat(BURST as usize + 3), t0);
    let _ = run(&mut f, b"tail", t0);
    let mut last = Vec::new();
    f.finish(t0, &mut |l| last.push(l));
    assert_eq!(last, vec![Relayed::Dropped(4)]);
}

#[test]
fn the_level_is_read_from_the_first_bytes_only() {
    use tracing::Level;
    assert_eq!(level_of(r#"{"level":"WARN","message":"x"}"#), Level::WARN);
    assert_eq!(level_of(r#"{"level":"ERROR"}"#), Level::ERROR);
    assert_eq!(level_of(r#"{"level":"DEBUG","#), Level::DEBUG);
    assert_eq!(level_of(r#" {"level":"ERROR"}"#), Level::INFO);
    assert_eq!(level_of(r#"{"message":"x","level":"ERROR"}"#), Level::INFO);
    assert_eq!(level_of("plain text"), Level::INFO);
}

/// A hostile worker writes lines that claim another minor and pid, and a
/// newline-injected broker line: every line it wrote is logged as one
/// `line` string under its own pid and minor, and no other event exists.
#[test]
fn a_worker_cannot_forge_another_minor_or_a_broker_line() {
    let pid = 4_000_001;
    let minor = Minor::new(7).unwrap();
    let forged = concat!(
        r#"{"level":"ERROR","message":"x","minor":9,"pid":1,"target":"tap_broker"}"#,
        "\n",
        r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","message":"serving","minor":9}"#,
        "\r",
        r#"{"level":"INFO","pid":1}"#,
        "\x1b[2K\n",
        "\"},\"minor\":9,\"x\":{\"\n",
    );
    let mut f = LineFilter::new();
    let relayed = run(&mut f, forged.as_bytes(), Instant::now());
    let events = logged(|| {
        for r in &relayed {
            log(pid, Some(minor), r);
        }
    });
    assert_eq!(events.len(), 3, "{events:#?}");
    for e in &events {
        assert_eq!(e["target"], "tapdisk", "{e}");
        assert_eq!(e["pid"], pid, "{e}");
        assert_eq!(e["minor"], 7, "{e}");
        assert_eq!(e["message"], "worker line", "{e}");
        let l = e["line"].as_str().unwrap();
        assert!(l.bytes().all(|b| (0x20..0x7f).contains(&b)), "{l:?}");
    }
    // The first line claims ERROR: its own line is logged at that level,
    // still as its own.
    assert_eq!(events[0]["level"], "ERROR");
    assert_eq!(
        events[0]["line"],
        r#"{"level":"ERROR","message":"x","minor":9,"pid":1,"target":"tap_broker"}"#
    );
    // The carriage return did not start a line.
    assert!(events[1]["line"]
        .as_str()
        .unwrap()
        .contains(r#"\x0d{"level":"INFO","pid":1}\x1b[2K"#));
    assert_eq!(events[2]["line"], r#""},"minor":9,"x":{""#);
}

#[test]
fn a_detached_worker_is_logged_without_a_minor_and_drops_as_a_warning() {
    let events = logged(|| {
        log(4_000_002, None, &line("bye"));
        log(4_000_002, None, &Relayed::Dropped(12));
    });
    assert_eq!(events[0]["pid"], 4_000_002);
    assert!(events[0].get("minor").is_none(), "{}", events[0]);
    assert_eq!(events[1]["level"], "WARN");
    assert_eq!(events[1]["dropped"], 12);
    assert_eq!(
        events[1]["message"],
        "12 worker line(s) dropped (more than 10 lines/s)"
    );
}

#[test]
fn the_tag_follows_the_minor() {
    let pid = 4_000_003;
    tag(Minor::new(8).unwrap(), Some(pid));
    assert_eq!(minor_of(pid), Minor::new(8).ok());
    tag(Minor::new(8).unwrap(), None);
    assert_eq!(minor_of(pid), None);
}
