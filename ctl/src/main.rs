//! `tap-ctl`: blktap-compatible lifecycle commands (talking to tap-broker)
//! and offline VHD tools that work on the caller's own files.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod client;
mod lifecycle;
mod vhd;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline VHD image tools (vhd-util's verbs).
    Vhd {
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
    #[command(flatten)]
    Lifecycle(lifecycle::LifecycleCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vhd { command } => vhd::run(command),
        Command::Policy { command } => admin::policy(command),
        Command::Audit { command } => admin::audit(command),
        Command::Lifecycle(command) => lifecycle::run(command, &cli.socket),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tap-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
