//! `tap-ctl metrics`: every visible disk's counters and latency histograms
//! in Prometheus' text exposition format 0.0.4, for node_exporter's
//! textfile collector. The broker decides which disks a caller sees (the
//! same policy as `list` and `stats`); this module only renders, escaping
//! every label value, since image paths and layer names are chosen by
//! tenants and must not forge lines or labels.

use crate::client::Client;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use tapjail_common::proto::{ListEntry, Reply, Request, StatsReply};
use tapjail_common::stats::{Histogram, LATENCY_BOUNDS_US};

/// `tap-ctl metrics [-o PATH | --listen ADDR]`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Write to PATH atomically (temp file + rename, for node_exporter's
    /// textfile collector) instead of standard output.
    #[arg(short = 'o', value_name = "PATH", conflicts_with = "listen")]
    output: Option<std::path::PathBuf>,
    /// Serve the exposition over HTTP at ADDR (such as 127.0.0.1:9477)
    /// for Prometheus to scrape, until killed: GET /metrics only, each
    /// scrape showing what this user may see.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Print the same figures as one JSON array instead: per disk its
    /// `list --json` row under "disk" and its `stats` document under
    /// "stats" (null when the tapdisk did not answer).
    #[arg(long, conflicts_with = "listen")]
    json: bool,
}

/// Collect, render and print or write the exposition.
pub fn run(
    args: MetricsArgs,
    socket: &Path,
    timeout: std::time::Duration,
) -> anyhow::Result<std::process::ExitCode> {
    if let Some(addr) = &args.listen {
        serve::run(addr, socket, timeout)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let client = Client::connect(socket, timeout)?;
    let disks = collect(&client)?;
    let text = if args.json {
        json(&disks)? + "\n"
    } else {
        render(&disks)
    };
    match args.output {
        Some(path) => write_atomic(&path, &text)?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One disk as `list` shows it, with its stats if the worker answered.
#[derive(Debug)]
pub struct DiskMetrics {
    pub row: ListEntry,
    pub stats: Option<StatsReply>,
}

/// Ask the broker for every visible minor and its stats. A disk whose
/// stats fail (no image open, worker restarting) is still listed, with
/// `tapjail_disk_up` 0.
pub fn collect(client: &Client) -> anyhow::Result<Vec<DiskMetrics>> {
    let rows = match client.call(&Request::List {
        pid: None,
        minor: None,
    })? {
        Reply::List(rows) => rows,
        other => anyhow::bail!("tap-broker answered List with {other:?}"),
    };
    let mut out = Vec::new();
    for row in rows {
        let Some(minor) = row.minor else { continue };
        let stats = match (row.pid, &row.image) {
            (Some(pid), Some(_)) => match client.call(&Request::Stats {
                pid: Some(pid),
                minor,
            }) {
                Ok(Reply::Stats(s)) => Some(*s),
                _ => None,
            },
            _ => None,
        };
        out.push(DiskMetrics { row, stats });
    }
    Ok(out)
}

/// `metrics --json`: `[{"disk": ROW, "stats": DOC | null}, ...]`.
pub fn json(disks: &[DiskMetrics]) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for d in disks {
        let stats: serde_json::Value = match &d.stats {
            Some(s) => serde_json::from_str(&crate::lifecycle::stats_json(s)?)?,
            None => serde_json::Value::Null,
        };
        out.push(serde_json::json!({
            "disk": crate::lifecycle::JsonRow::from(&d.row),
            "stats": stats,
        }));
    }
    Ok(serde_json::to_string(&out)?)
}

/// A label value escaped per the exposition format: `\`, `"` and newline.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The labels every series of a disk carries: `minor`, `tenant`,
/// `frontend`, `image`, escaped and in that order.
fn disk_labels(d: &DiskMetrics) -> String {
    let minor = d.row.minor.map_or_else(String::new, |m| m.to_string());
    let tenant = d.stats.as_ref().map_or("", |s| s.tenant.as_str());
    let frontend = d.row.frontend.map_or("", |f| f.as_str());
    let image = d
        .row
        .image
        .as_ref()
        .map_or_else(String::new, |i| format!("{}:{}", i.kind, i.path));
    format!(
        "minor=\"{}\",tenant=\"{}\",frontend=\"{}\",image=\"{}\"",
        escape_label(&minor),
        escape_label(tenant),
        escape_label(frontend),
        escape_label(&image)
    )
}

/// Writes families: each `# HELP`/`# TYPE` once, then its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
    }
}

/// Microseconds as seconds, exactly enough for the format.
fn seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

fn histogram(out: &mut Out, name: &str, labels: &str, h: &Histogram) {
    if !h.well_formed() {
        return;
    }
    let mut cum = 0u64;
    for (i, c) in h.counts.iter().enumerate() {
        cum = cum.saturating_add(*c);
        let le = LATENCY_BOUNDS_US
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| seconds(*b));
        out.sample(
            &format!("{name}_bucket"),
            &format!("{labels},le=\"{le}\""),
            cum,
        );
    }
    out.sample(&format!("{name}_sum"), labels, seconds(h.sum_us));
    out.sample(&format!("{name}_count"), labels, cum);
}

/// The whole exposition for `disks`.
pub fn render(disks: &[DiskMetrics]) -> String {
    let mut o = Out(String::new());
    let with_stats = || {
        disks
            .iter()
            .filter_map(|d| d.stats.as_ref().map(|s| (disk_labels(d), s)))
    };

    o.family(
        "tapjail_disk_up",
        "gauge",
        "1 if the disk's tapdisk answered for stats, else 0.",
    );
    for d in disks {
        o.sample(
            "tapjail_disk_up",
            &disk_labels(d),
            u8::from(d.stats.is_some()),
        );
    }
    o.family(
        "tapjail_disk_state",
        "gauge",
        "The minor's blktap state bits (tap-ctl list's state column).",
    );
    for d in disks {
        if let Some(s) = d.row.state {
            o.sample("tapjail_disk_state", &disk_labels(d), s.0);
        }
    }
    o.family(
        "tapjail_disk_restarts_total",
        "counter",
        "Times the broker replaced a dead tapdisk for this minor.",
    );
    for d in disks {
        o.sample(
            "tapjail_disk_restarts_total",
            &disk_labels(d),
            d.row.restarts,
        );
    }
    o.family(
        "tapjail_disk_requests_received_total",
        "counter",
        "Requests the tapdisk received from its frontend.",
    );
    for (l, s) in with_stats() {
        o.sample(
            "tapjail_disk_requests_received_total",
            &l,
            s.worker.frontend.reqs[0],
        );
    }
    o.family(
        "tapjail_disk_requests_completed_total",
        "counter",
        "Requests the tapdisk completed, failed ones included.",
    );
    for (l, s) in with_stats() {
        o.sample(
            "tapjail_disk_requests_completed_total",
            &l,
            s.worker.frontend.reqs[1],
        );
    }
    o.family(
        "tapjail_disk_request_errors_total",
        "counter",
        "Requests answered with an error.",
    );
    for (l, s) in with_stats() {
        o.sample(
            "tapjail_disk_request_errors_total",
            &l,
            s.worker.frontend.errors,
        );
    }
    o.family(
        "tapjail_disk_kicks_total",
        "counter",
        "blktap's kicks: wakeups that brought requests (direction in), calls that \
         handed completions back (out).",
    );
    for (l, s) in with_stats() {
        for (dir, v) in [
            ("in", s.worker.frontend.kicks[0]),
            ("out", s.worker.frontend.kicks[1]),
        ] {
            o.sample(
                "tapjail_disk_kicks_total",
                &format!("{l},direction=\"{dir}\""),
                v,
            );
        }
    }
    o.family(
        "tapjail_disk_requests_outstanding",
        "gauge",
        "Requests received and not yet completed.",
    );
    for (l, s) in with_stats() {
        o.sample(
            "tapjail_disk_requests_outstanding",
            &l,
            s.worker.reqs_outstanding,
        );
    }
    o.family(
        "tapjail_disk_bytes_total",
        "counter",
        "Bytes read or written through the frontend, in 512-byte sectors' worth.",
    );
    for (l, s) in with_stats() {
        for (op, secs) in [("read", s.worker.secs[0]), ("write", s.worker.secs[1])] {
            let l = format!("{l},op=\"{op}\"");
            o.sample("tapjail_disk_bytes_total", &l, secs.saturating_mul(512));
        }
    }
    o.family(
        "tapjail_layer_bytes_total",
        "counter",
        "Bytes read or written on each layer of the image chain (layer 0 is the leaf).",
    );
    for (l, s) in with_stats() {
        for (depth, img) in s.worker.images.iter().enumerate() {
            for (op, secs) in [("read", img.hits[0]), ("write", img.hits[1])] {
                let l = format!(
                    "{l},layer=\"{depth}\",layer_name=\"{}\",op=\"{op}\"",
                    escape_label(&img.name)
                );
                o.sample("tapjail_layer_bytes_total", &l, secs.saturating_mul(512));
            }
        }
    }
    o.family(
        "tapjail_layer_errors_total",
        "counter",
        "Failed reads or writes on each layer of the image chain.",
    );
    for (l, s) in with_stats() {
        for (depth, img) in s.worker.images.iter().enumerate() {
            for (op, n) in [("read", img.fail[0]), ("write", img.fail[1])] {
                let l = format!(
                    "{l},layer=\"{depth}\",layer_name=\"{}\",op=\"{op}\"",
                    escape_label(&img.name)
                );
                o.sample("tapjail_layer_errors_total", &l, n);
            }
        }
    }
    o.family(
        "tapjail_disk_request_duration_seconds",
        "histogram",
        "Request latency in the tapdisk, from admission to completion.",
    );
    for (l, s) in with_stats() {
        for (op, h) in s.worker.histograms.by_op() {
            let l = format!("{l},op=\"{op}\"");
            histogram(&mut o, "tapjail_disk_request_duration_seconds", &l, h);
        }
    }
    o.family(
        "tapjail_disk_throttle_delayed_requests_total",
        "counter",
        "Requests that waited for the disk's or its tenant's I/O limits.",
    );
    for (l, s) in with_stats() {
        if let Some(t) = &s.throttle {
            for (op, n) in [("read", t.delayed[0]), ("write", t.delayed[1])] {
                let l = format!("{l},op=\"{op}\"");
                o.sample("tapjail_disk_throttle_delayed_requests_total", &l, n);
            }
        }
    }
    o.family(
        "tapjail_disk_throttle_delay_seconds_total",
        "counter",
        "Time requests spent waiting for I/O limits.",
    );
    for (l, s) in with_stats() {
        if let Some(t) = &s.throttle {
            for (op, us) in [("read", t.delay_us[0]), ("write", t.delay_us[1])] {
                let l = format!("{l},op=\"{op}\"");
                o.sample("tapjail_disk_throttle_delay_seconds_total", &l, seconds(us));
            }
        }
    }
    o.0
}

/// Write `text` to `path` so that a reader sees the old file or the new
/// one, never a part: a temp file beside it (not ending in `.prom`, so
/// the textfile collector ignores it), synced, then renamed over `path`.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("-o {}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot write metrics to {} (via {}); check that the directory exists and is \
                 writable by you",
                path.display(),
                tmp.display()
            )
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

mod serve;
