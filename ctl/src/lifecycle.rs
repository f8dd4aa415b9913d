//! Lifecycle commands: tap-ctl allocate, spawn, attach, open, ... via the
//! broker, printing what blktap's tap-ctl prints.

use crate::client::Client;
use crate::escape::escape;
use clap::Subcommand;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use tapjail_common::proto::{ImageSpec, ListEntry, Reply, Request, StatsReply};
use tapjail_common::stats::{ImageStats, LatencyStats};
use tapjail_common::Minor;

#[derive(Debug, Subcommand)]
pub enum LifecycleCommand {
    /// Allocate a minor; prints its device path.
    Allocate {
        /// Ask for this minor instead of the lowest free one.
        #[arg(short = 'm', value_name = "MINOR", conflicts_with = "device")]
        minor: Option<Minor>,
        /// Ask for the minor this device path names (DIR/tapdevN).
        #[arg(short = 'd', value_name = "DEVPATH")]
        device: Option<String>,
        /// Print {"minor": N, "device": PATH} instead of the device path.
        #[arg(long)]
        json: bool,
    },
    /// Release a minor (it must be detached).
    Free {
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
    },
    /// Start a tapdisk worker; prints its pid.
    Spawn {
        /// Print {"pid": N} instead of the pid.
        #[arg(long)]
        json: bool,
    },
    /// Attach a tapdisk to a minor.
    Attach {
        /// The tapdisk, as `tap-ctl spawn` or `tap-ctl list` shows it.
        #[arg(short = 'p', value_name = "PID")]
        pid: u32,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
    },
    /// Detach a minor's tapdisk; this ends that tapdisk.
    Detach {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
    },
    /// Open an image on an attached minor; the device appears.
    Open {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// TYPE:PATH, TYPE being vhd or aio (raw).
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        image: ImageSpec,
        /// Read-only.
        #[arg(short = 'R')]
        read_only: bool,
        #[command(flatten)]
        xapi: crate::xapi::OpenFlags,
    },
    /// Close a minor's image; the device goes away.
    Close {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// Close even if the tapdisk does not answer (it is then killed).
        #[arg(short = 'f')]
        force: bool,
        #[command(flatten)]
        xapi: crate::xapi::Timeout,
    },
    /// allocate + spawn + attach + open; prints the device path.
    Create {
        /// TYPE:PATH, TYPE being vhd or aio (raw).
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        image: ImageSpec,
        /// Read-only.
        #[arg(short = 'R')]
        read_only: bool,
        /// Use this minor.
        #[arg(short = 'e', value_name = "MINOR")]
        minor: Option<Minor>,
        /// Print {"minor": N, "pid": N, "device": PATH} instead of the
        /// device path.
        #[arg(long)]
        json: bool,
    },
    /// close + detach + free (also for a dead tapdisk).
    Destroy {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
    },
    /// Quiesce I/O and close the image (for offline snapshot or coalesce).
    Pause {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        #[command(flatten)]
        xapi: crate::xapi::Timeout,
    },
    /// Reopen a paused image, optionally at a new path of the same size.
    Unpause {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// Reopen this image instead (TYPE:PATH; same virtual size).
        #[arg(short = 'a', value_name = "TYPE:PATH")]
        image: Option<ImageSpec>,
        #[command(flatten)]
        xapi: crate::xapi::UnpauseFlags,
    },
    /// List tapdisks and minors: "pid minor state type file" (on a
    /// terminal a -2 mirror adds a line: "mirror STATE URI").
    List {
        /// Only this tapdisk's rows.
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// Only this minor's rows.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Option<Minor>,
        /// Only rows of this image type (vhd, or aio = raw).
        #[arg(short = 't', value_name = "TYPE", value_parser = ["vhd", "aio", "raw"])]
        kind: Option<String>,
        /// Only rows of this image file.
        #[arg(short = 'f', value_name = "FILE")]
        file: Option<String>,
        /// Print one JSON array, a row per tapdisk or minor: {"pid",
        /// "minor", "state" (blktap's state bits as a number), "type"
        /// (vhd or aio), "file", "read_only", "frontend" (ublk, fuse or
        /// nbd), "device", "restarts", "mirror" ({"uri", "mode", "state":
        /// copying, synced, standby, failed-over, failed or unknown,
        /// "copied", "total", "error"} for a -2 mirror)}; null for what
        /// is missing.
        #[arg(long)]
        json: bool,
    },
    /// Print a minor's I/O statistics as JSON.
    ///
    /// The document has blktap's keys ("name",
    /// "secs" [read, written sectors], "images" leaf first with "hits",
    /// "fail" and "driver", "tap" with "minor", "reqs" [in, out] and
    /// "kicks" [in, out], "reqs_outstanding", "nbd_mirror_failed": 1 once
    /// a -2 secondary failed), then tapjail's own ("latency", "cgroup",
    /// "throttle", and "mirror" with state and copied/total bytes).
    Stats {
        /// The minor's tapdisk, as `tap-ctl list` shows it (optional: the
        /// minor alone names it).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// Accepted for consistency: stats always prints its JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Change a disk's or a tenant's I/O limits now (admin only; audited).
    /// Prints the limits in force afterwards.
    Throttle(crate::throttle::ThrottleArgs),
    /// Print the block major number of this host's tapjail devices.
    Major {
        /// Print {"major": N} instead of the number.
        #[arg(long)]
        json: bool,
    },
    /// Online snapshot: create CHILD, a differencing child of the open
    /// leaf, and make it the leaf while the disk serves. Prints how long
    /// I/O was held.
    Snapshot {
        /// The tapdisk's pid, as `tap-ctl list` shows it (checked if given).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// The new child image (must not exist; beneath your image roots).
        #[arg(short = 'n', value_name = "CHILD")]
        child: String,
        /// Print {"child", "chain", "stall_us"} instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Online coalesce: merge the open leaf and its parent while the disk
    /// serves. Waits until done; `tap-ctl stats` shows progress meanwhile.
    ///
    /// --stream (qemu's block-stream) copies every sector the leaf lacks
    /// from its parent into the leaf, then drops the parent: the leaf
    /// becomes a dynamic VHD naming no parent (the parent must be the
    /// chain's base). Guest writes racing a copied range win: a range is
    /// copied with writes to it held out, only into sectors the leaf still
    /// lacks.
    ///
    /// --commit (qemu's block-commit) copies the leaf's sectors into its
    /// parent, copying again what the guest writes meanwhile, then holds
    /// I/O for one last pass and a flush and serves the parent as the leaf
    /// (the old leaf file is left, no longer used). The parent must be
    /// beneath an image root you may write, and no other disk may use it:
    /// a parent shared with another minor is refused.
    ///
    /// The copy runs in the confined tapdisk, chunk by chunk between the
    /// guest's requests, at most --rate MiB/s. Until the switch the old
    /// chain reads as the disk does; the new chain is on record only once
    /// it is complete and durable. A tapdisk killed mid-merge is replaced
    /// and the merge started again on its successor (a stream resumes, a
    /// commit copies again). Pause, unpause, snapshot and mirroring wait
    /// for the merge. Audited, allowed to the disk's owner and admins.
    Coalesce {
        /// The tapdisk's pid, as `tap-ctl list` shows it (checked if given).
        #[arg(short = 'p', value_name = "PID")]
        pid: Option<u32>,
        /// The disk's minor number (0..16383), as `tap-ctl list` shows it.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// Copy the parent into the leaf (qemu's block-stream).
        #[arg(long, conflicts_with = "commit", required_unless_present = "commit")]
        stream: bool,
        /// Copy the leaf into its parent (qemu's block-commit).
        #[arg(long)]
        commit: bool,
        /// Copy at most this many MiB per second (default 64).
        #[arg(long, value_name = "MIB_PER_SEC")]
        rate: Option<u32>,
        /// Print {"direction", "chain", "copied_bytes", "stall_us", "restarts"}.
        #[arg(long)]
        json: bool,
    },
}

impl LifecycleCommand {
    /// Whether the command was asked for one JSON document (`--json`).
    fn json(&self) -> bool {
        use LifecycleCommand as C;
        match self {
            C::Allocate { json, .. }
            | C::Spawn { json }
            | C::Create { json, .. }
            | C::List { json, .. }
            | C::Stats { json, .. }
            | C::Major { json }
            | C::Snapshot { json, .. }
            | C::Coalesce { json, .. } => *json,
            C::Throttle(a) => a.json,
            _ => false,
        }
    }
}

/// `-a disk.vhd` relative to the caller's directory, made absolute (the
/// broker has no idea where the caller is). Lexical only: the broker
/// refuses symlinks and `..` itself.
fn absolute(mut spec: ImageSpec) -> anyhow::Result<ImageSpec> {
    if !Path::new(&spec.path).is_absolute() {
        let abs = std::path::absolute(&spec.path).map_err(|e| {
            anyhow::anyhow!(
                "cannot tell where {} is: the current directory is unavailable ({e}); \
                 give the image's absolute path",
                spec.path
            )
        })?;
        spec.path = abs.display().to_string();
    }
    Ok(spec)
}

pub fn run(
    command: LifecycleCommand,
    socket: &Path,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let tty = std::io::stdout().is_terminal();
    let json = command.json();
    let (req, list_filter) = match command {
        LifecycleCommand::Allocate { minor, device, .. } => (
            crate::xapi::wrap(
                Request::Allocate { minor },
                tapjail_common::xapi::Options {
                    device,
                    ..Default::default()
                },
            ),
            None,
        ),
        LifecycleCommand::Free { minor } => (Request::Free { minor }, None),
        LifecycleCommand::Spawn { .. } => (Request::Spawn, None),
        LifecycleCommand::Attach { pid, minor } => (Request::Attach { pid, minor }, None),
        LifecycleCommand::Detach { pid, minor } => (Request::Detach { pid, minor }, None),
        LifecycleCommand::Open {
            pid,
            minor,
            image,
            read_only,
            xapi,
        } => {
            let encryption = xapi.encryption;
            let opts = crate::xapi::with_key(xapi.options(), encryption)?;
            (
                crate::xapi::wrap(
                    Request::Open {
                        pid,
                        minor,
                        image: absolute(image)?,
                        read_only,
                    },
                    opts,
                ),
                None,
            )
        }
        LifecycleCommand::Close {
            pid,
            minor,
            force,
            xapi,
        } => (
            crate::xapi::wrap(Request::Close { pid, minor, force }, xapi.options()),
            None,
        ),
        LifecycleCommand::Create {
            image,
            read_only,
            minor,
            ..
        } => (
            Request::Create {
                image: absolute(image)?,
                read_only,
                minor,
            },
            None,
        ),
        LifecycleCommand::Destroy { pid, minor } => (Request::Destroy { pid, minor }, None),
        LifecycleCommand::Pause { pid, minor, xapi } => (
            crate::xapi::wrap(Request::Pause { pid, minor }, xapi.options()),
            None,
        ),
        LifecycleCommand::Unpause {
            pid,
            minor,
            image,
            xapi,
        } => {
            let encryption = xapi.encryption;
            let opts = crate::xapi::with_key(xapi.options(), encryption)?;
            (
                crate::xapi::wrap(
                    Request::Unpause {
                        pid,
                        minor,
                        image: image.map(absolute).transpose()?,
                    },
                    opts,
                ),
                None,
            )
        }
        LifecycleCommand::List {
            pid,
            minor,
            kind,
            file,
            ..
        } => {
            // `raw` is what `-a raw:PATH` accepts for aio; rows say aio.
            let kind = kind.map(|k| if k == "raw" { "aio".to_string() } else { k });
            (Request::List { pid, minor }, Some((kind, file)))
        }
        LifecycleCommand::Stats { pid, minor, .. } => (Request::Stats { pid, minor }, None),
        LifecycleCommand::Throttle(args) => (args.request().map_err(anyhow::Error::msg)?, None),
        LifecycleCommand::Major { .. } => (Request::Major, None),
        LifecycleCommand::Snapshot {
            pid, minor, child, ..
        } => {
            let child = absolute(ImageSpec {
                kind: tapjail_common::proto::ImageKind::Vhd,
                path: child,
            })?
            .path;
            (Request::Snapshot { pid, minor, child }, None)
        }
        LifecycleCommand::Coalesce {
            pid,
            minor,
            commit,
            rate,
            ..
        } => (
            Request::Coalesce {
                pid,
                minor,
                direction: if commit {
                    tapjail_common::coalesce::Direction::Commit
                } else {
                    tapjail_common::coalesce::Direction::Stream
                },
                rate: u64::from(rate.unwrap_or(0)) << 20,
            },
            None,
        ),
    };
    // A coalesce answers when the merge is done, however long it takes.
    let wait = if matches!(req, Request::Coalesce { .. }) {
        std::time::Duration::from_secs(7 * 24 * 3600)
    } else {
        crate::xapi::client_wait(&req, timeout)
    };
    let client = Client::connect(socket, wait)?;
    let reply = client.call(&req).map_err(crate::next_step::add)?;
    if json {
        if let Some(doc) = crate::json::reply(&reply) {
            println!("{doc}");
            return Ok(ExitCode::SUCCESS);
        }
    }
    match reply {
        Reply::Allocated { device, .. } | Reply::Created { device, .. } => {
            println!("{}", escape(&device))
        }
        Reply::Spawned { pid } => {
            if tty {
                println!("tapdisk spawned with pid {pid}");
            } else {
                println!("{pid}");
            }
        }
        Reply::List(rows) => {
            let (kind, file) = list_filter.unwrap_or((None, None));
            let rows: Vec<ListEntry> = rows
                .into_iter()
                .filter(|r| keep(r, kind.as_deref(), file.as_deref()))
                .collect();
            // SM's key=value form stays blktap's (see `list_mirror`).
            let mut mirrors = if json || tty {
                crate::list_mirror::views(&client, &rows)
            } else {
                Vec::new()
            };
            mirrors.resize(rows.len(), None);
            if json {
                let out: Vec<JsonRow> = rows
                    .iter()
                    .zip(mirrors)
                    .map(|(r, m)| JsonRow {
                        mirror: m,
                        ..JsonRow::from(r)
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for (r, m) in rows.iter().zip(&mirrors) {
                    println!("{}", if tty { row_tty(r) } else { row_dict(r) });
                    if let Some(m) = m {
                        println!("{}", m.tty_line());
                    }
                }
            }
        }
        Reply::Stats(s) => println!("{}", stats_json(&s)?),
        Reply::Throttled(limits) => println!("{limits}"),
        Reply::Major { major } => println!("{major}"),
        Reply::Snapshotted(done) => println!(
            "snapshot {}: I/O held {}.{:03} ms (stall_us={})",
            escape(&done.child),
            done.stall_us / 1000,
            done.stall_us % 1000,
            done.stall_us
        ),
        Reply::Coalesced(done) => println!(
            "coalesce ({}): {} bytes copied, I/O held {}.{:03} ms (stall_us={}), chain: {}",
            done.direction,
            done.copied_bytes,
            done.stall_us / 1000,
            done.stall_us % 1000,
            done.stall_us,
            done.chain
                .iter()
                .map(|c| escape(c))
                .collect::<Vec<_>>()
                .join(" <- ")
        ),
        Reply::Ok | Reply::Hello { .. } | Reply::Cbt(_) => {}
        Reply::Error { message, .. } => anyhow::bail!(message),
    }
    Ok(ExitCode::SUCCESS)
}

/// blktap's filter: a row without a type (or file) is not excluded by -t (-f).
fn keep(r: &ListEntry, kind: Option<&str>, file: Option<&str>) -> bool {
    let t_ok = match (kind, &r.image) {
        (Some(k), Some(img)) => img.kind.as_str() == k,
        _ => true,
    };
    let f_ok = match (file, &r.image) {
        (Some(f), Some(img)) => img.path == f,
        _ => true,
    };
    t_ok && f_ok
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
fn c_hex(v: u32) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// `"%8s %4s %4s %10s %s"` with `-` for what is missing, as blktap.
pub fn row_tty(r: &ListEntry) -> String {
    let dash = || "-".to_string();
    format!(
        "{:>8} {:>4} {:>4} {:>10} {}",
        r.pid.map_or_else(dash, |p| p.to_string()),
        r.minor.map_or_else(dash, |m| m.to_string()),
        r.state.map_or_else(dash, |s| c_hex(s.0)),
        r.image
            .as_ref()
            .map_or_else(dash, |i| i.kind.as_str().to_string()),
        r.image.as_ref().map_or_else(dash, |i| escape(&i.path)),
    )
}

/// `pid=%d minor=%d state=%#x args=%s:%s`, only the fields present.
pub fn row_dict(r: &ListEntry) -> String {
    let mut parts = Vec::new();
    if let Some(p) = r.pid {
        parts.push(format!("pid={p}"));
    }
    if let Some(m) = r.minor {
        parts.push(format!("minor={m}"));
    }
    if let Some(s) = r.state {
        parts.push(format!("state={}", c_hex(s.0)));
    }
    if let Some(i) = &r.image {
        parts.push(format!("args={}:{}", i.kind, escape(&i.path)));
    }
    parts.join(" ")
}

/// One `list --json` row.
#[derive(Debug, Serialize)]
pub struct JsonRow {
    pid: Option<u32>,
    minor: Option<u16>,
    state: Option<u32>,
    #[serde(rename = "type")]
    kind: Option<&'static str>,
    file: Option<String>,
    read_only: bool,
    frontend: Option<&'static str>,
    device: Option<String>,
    restarts: u32,
    /// The `-2` mirror: uri, mode, state, copied/total, error; or null.
    mirror: Option<crate::list_mirror::MirrorView>,
}

impl From<&ListEntry> for JsonRow {
    fn from(r: &ListEntry) -> Self {
        JsonRow {
            pid: r.pid,
            minor: r.minor.map(|m| m.get()),
            state: r.state.map(|s| s.0),
            kind: r.image.as_ref().map(|i| i.kind.as_str()),
            file: r.image.as_ref().map(|i| i.path.clone()),
            read_only: r.read_only,
            frontend: r.frontend.map(|f| f.as_str()),
            device: r.device.clone(),
            restarts: r.restarts,
            mirror: None,
        }
    }
}

/// blktap's keys first (`name`, `secs`, `images`, `tap`,
/// `reqs_outstanding`), then ours.
#[derive(Debug, Serialize)]
struct StatsJson<'a> {
    name: &'a str,
    secs: [u64; 2],
    images: &'a [ImageStats],
    tap: TapJson<'a>,
    reqs_outstanding: u64,
    latency: &'a LatencyStats,
    /// The worker's cgroup (path, memory.current, pids.current, ...), or null.
    cgroup: Option<&'a tapjail_common::stats::CgroupStats>,
    /// I/O limits in force and the delays they caused.
    #[serde(skip_serializing_if = "Option::is_none")]
    throttle: Option<&'a tapjail_common::qos::ThrottleStats>,
    /// blktap's flag XAPI polls during a storage migration: 1 once the
    /// `-2` secondary failed and mirroring stopped.
    nbd_mirror_failed: u8,
    /// The `-2` mirror: uri, mode, state, copied/total bytes, error.
    #[serde(skip_serializing_if = "Option::is_none")]
    mirror: Option<&'a tapjail_common::mirror::MirrorStats>,
    /// Online snapshots taken by this worker and their stalls (once any).
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a tapjail_common::snapshot::SnapshotStats>,
    /// `open -r`: the read cache's hits, misses and fills (sectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    read_cache: Option<&'a tapjail_common::read_cache::ReadCacheStats>,
    /// The online coalesce running (or last run): direction, state,
    /// done/total chunks, copied bytes, error.
    #[serde(skip_serializing_if = "Option::is_none")]
    coalesce: Option<&'a tapjail_common::coalesce::CoalesceStats>,
}

#[derive(Debug, Serialize)]
struct TapJson<'a> {
    minor: u16,
    pid: u32,
    frontend: Option<&'static str>,
    reqs: [u64; 2],
    /// blktap's `kicks` [in, out] (see `FrontendStats::kicks`).
    kicks: [u64; 2],
    errors: u64,
    restarts: u32,
    worker_frontend: &'a str,
}

pub fn stats_json(s: &StatsReply) -> serde_json::Result<String> {
    let w = &s.worker;
    serde_json::to_string(&StatsJson {
        name: &w.name,
        secs: w.secs,
        images: &w.images,
        tap: TapJson {
            minor: s.minor.get(),
            pid: s.pid,
            frontend: s.frontend.map(|f| f.as_str()),
            reqs: w.frontend.reqs,
            kicks: w.frontend.kicks,
            errors: w.frontend.errors,
            restarts: s.restarts,
            worker_frontend: &w.frontend.kind,
        },
        reqs_outstanding: w.reqs_outstanding,
        latency: &w.latency,
        cgroup: s.cgroup.as_ref(),
        throttle: s.throttle.as_ref(),
        nbd_mirror_failed: u8::from(
            w.mirror
                .as_ref()
                .is_some_and(|m| m.state == tapjail_common::mirror::MirrorState::Failed),
        ),
        mirror: w.mirror.as_ref(),
        snapshot: Some(&w.snapshot).filter(|s| s.count > 0),
        read_cache: w.read_cache.as_ref(),
        coalesce: w.coalesce.as_ref(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::proto::ImageKind;
    use tapjail_common::state::State;

    fn row(
        pid: Option<u32>,
        minor: Option<u16>,
        state: Option<u32>,
        image: Option<&str>,
    ) -> ListEntry {
        ListEntry {
            pid,
            minor: minor.map(|m| Minor::new(u64::from(m)).unwrap()),
            state: state.map(State),
            image: image.map(|p| ImageSpec {
                kind: ImageKind::Vhd,
                path: p.into(),
            }),
            read_only: false,
            frontend: None,
            device: None,
            restarts: 0,
            mirror: None,
        }
    }

    #[test]
    fn list_tty_rows_match_the_seed_exactly() {
        assert_eq!(
            row_tty(&row(None, Some(0), None, None)),
            "       -    0    -          - -"
        );
        assert_eq!(
            row_tty(&row(Some(5755), None, None, None)),
            "    5755    -    -          - -"
        );
        assert_eq!(
            row_tty(&row(Some(5755), Some(0), Some(0), None)),
            "    5755    0    0          - -"
        );
        assert_eq!(
            row_tty(&row(
                Some(5755),
                Some(0),
                Some(0),
                Some("/home/djs/smalltest.vhd")
            )),
            "    5755    0    0        vhd /home/djs/smalltest.vhd"
        );
        assert_eq!(
            row_tty(&row(Some(1), Some(2), Some(0x21), None)),
            "       1    2 0x21          - -"
        );
    }

    #[test]
    fn list_dict_rows_match_blktap() {
        assert_eq!(row_dict(&row(None, Some(0), None, None)), "minor=0");
        assert_eq!(
            row_dict(&row(Some(7), Some(3), Some(0x20), Some("/a b"))),
            "pid=7 minor=3 state=0x20 args=vhd:/a b"
        );
        assert_eq!(
            row_dict(&row(Some(7), Some(3), Some(0), None)),
            "pid=7 minor=3 state=0"
        );
    }

    #[test]
    fn list_rows_escape_control_characters_in_paths() {
        // A tenant's file name that would retitle the admin's terminal,
        // clear it, and forge a second row.
        let evil =
            "/srv/alice/x\x1b]0;owned\x07\x1b[2J\n    6666    1    0        vhd /srv/bob/b.vhd";
        let r = row(Some(7), Some(3), Some(0), Some(evil));
        for line in [row_tty(&r), row_dict(&r)] {
            assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
            assert!(
                line.contains("x\\x1b]0;owned\\x07\\x1b[2J\\x0a    6666"),
                "{line}"
            );
        }
    }

    #[test]
    fn list_json_rows_carry_hostile_paths_escaped_and_intact() {
        // A tenant's file name that would forge a row or a key in a
        // line-oriented reader, and retitle a terminal.
        let evil = "/srv/alice/x\x1b]0;owned\x07\n\"},{\"pid\":1,\"file\":\"/srv/bob/b.vhd";
        let r = row(Some(7), Some(3), Some(0), Some(evil));
        let out = serde_json::to_string(&vec![JsonRow::from(&r)]).unwrap();
        assert!(!out.chars().any(|c| c.is_control()), "{out:?}");
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back.as_array().unwrap().len(), 1, "no forged row: {out}");
        assert_eq!(back[0]["file"], evil);
        assert_eq!(back[0]["pid"], 7);
    }

    #[test]
    fn list_type_and_file_filters_keep_rows_without_image() {
        let bare = row(None, Some(0), None, None);
        let vhd = row(Some(1), Some(1), Some(0), Some("/x.vhd"));
        assert!(keep(&bare, Some("aio"), Some("/y")));
        assert!(!keep(&vhd, Some("aio"), None));
        assert!(keep(&vhd, Some("vhd"), Some("/x.vhd")));
        assert!(!keep(&vhd, None, Some("/y")));
    }

    #[test]
    fn stats_json_has_blktap_keys_in_order() {
        let s = StatsReply {
            minor: Minor::new(0).unwrap(),
            pid: 5755,
            frontend: Some(tapjail_common::proto::FrontendKind::Nbd),
            restarts: 0,
            throttle: None,
            worker: tapjail_common::stats::WorkerStats {
                name: "vhd:/x.vhd".into(),
                secs: [664, 0],
                images: vec![ImageStats {
                    name: "/x.vhd".into(),
                    hits: [664, 0],
                    fail: [0, 0],
                    driver: tapjail_common::stats::DriverStats {
                        kind: 4,
                        name: "vhd".into(),
                        status: None,
                    },
                }],
                ..Default::default()
            },
            tenant: String::new(),
            cgroup: None,
        };
        let j = stats_json(&s).unwrap();
        assert!(j.starts_with(r#"{"name":"vhd:/x.vhd","secs":[664,0],"images":[{"name":"/x.vhd","hits":[664,0],"fail":[0,0],"driver":{"type":4,"name":"vhd","status":null}}],"tap":{"minor":0,"pid":5755,"frontend":"nbd""#), "{j}");
        assert!(j.contains(r#""reqs_outstanding":0"#));
        assert!(j.contains(r#""latency":{"#));
    }

    #[test]
    fn relative_image_path_is_made_absolute() {
        let s = absolute("aio:disk.img".parse().unwrap()).unwrap();
        assert!(s.path.starts_with('/'));
        assert!(s.path.ends_with("/disk.img"));
    }
}
