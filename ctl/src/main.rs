//! `tap-ctl`: blktap-compatible lifecycle commands (talking to tap-broker)
//! and offline VHD tools that work on the caller's own files, parsing them
//! in a confined child (`tapjail_ctl::privsep`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod cbt;
mod client;
#[cfg(test)]
mod docs;
mod escape;
mod json;
mod lifecycle;
mod list_mirror;
mod metrics;
mod next_step;
mod throttle;
mod vhd;
mod xapi;

#[derive(Debug, Parser)]
#[command(
    name = "tap-ctl",
    version,
    about = "Control tapjail disks and VHD images"
)]
struct Cli {
    /// tap-broker's control socket.
    #[arg(
        long,
        global = true,
        env = "TAPJAIL_SOCKET",
        value_name = "PATH",
        default_value = tapjail_common::proto::DEFAULT_SOCKET
    )]
    socket: PathBuf,
    /// Seconds to wait for tap-broker's answer before giving up.
    #[arg(
        long,
        global = true,
        env = "TAPJAIL_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = client::DEFAULT_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline VHD image tools (vhd-util's verbs).
    Vhd {
        /// No progress bar (one is drawn only when stdout and stderr are
        /// both terminals anyway).
        #[arg(short = 'q', long, global = true)]
        quiet: bool,
        #[command(subcommand)]
        command: vhd::VhdCommand,
    },
    /// Check a tap-broker policy file.
    Policy {
        #[command(subcommand)]
        command: admin::PolicyCommand,
    },
    /// Check a tap-broker audit log.
    Audit {
        #[command(subcommand)]
        command: admin::AuditCommand,
    },
    /// Print every visible disk's counters and latency histograms in
    /// Prometheus' text format.
    Metrics(metrics::MetricsArgs),
    /// Changed-block tracking of a disk, for incremental backup.
    Cbt {
        #[command(subcommand)]
        command: cbt::CbtCommand,
    },
    #[command(flatten)]
    Lifecycle(lifecycle::LifecycleCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics (warnings, `TAPJAIL_LOG=debug` request traces) are
    // tracing events; what a command prints, errors included, is not.
    tapjail_common::logging::init(tapjail_common::logging::Program::Tool);
    let result = match cli.command {
        Command::Vhd { quiet, command } => vhd::run(command, quiet),
        Command::Policy { command } => admin::policy(command),
        Command::Audit { command } => admin::audit(command),
        Command::Metrics(args) => metrics::run(
            args,
            &cli.socket,
            std::time::Duration::from_secs(cli.timeout),
        ),
        Command::Cbt { command } => cbt::run(
            command,
            &cli.socket,
            std::time::Duration::from_secs(cli.timeout),
        ),
        Command::Lifecycle(command) => lifecycle::run(
            command,
            &cli.socket,
            std::time::Duration::from_secs(cli.timeout),
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tap-ctl: {}", render(&e));
            xapi::exit_code(&e)
        }
    }
}

/// The error for the terminal: each cause said once, on one line, with
/// what came from others (file names, names read out of images) escaped.
pub(crate) fn render(e: &anyhow::Error) -> String {
    escape::escape(&tapjail_common::error_chain(e.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn render_error_with_repeated_source_says_it_once() {
        // ENOENT, as the engine reports a missing file.
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(tapjail_image::ImageError::Io {
            op: "open",
            offset: 0,
            source: io,
        })
        .context("x.vhd does not exist");
        let r = render(&e);
        assert_eq!(r.matches("os error 2").count(), 1, "{r}");
        assert!(r.starts_with("x.vhd does not exist: I/O error open"), "{r}");
    }
}
