//! `tap-ctl`: blktap-compatible lifecycle commands (talking to tap-broker)
//! and offline VHD tools that work on the caller's own files.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod lifecycle;
mod vhd;

#[derive(Debug, Parser)]
#[command(
    name = "tap-ctl",
    version,
    about = "Control tapjail disks and VHD images"
)]
struct Cli {
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
    #[command(flatten)]
    Lifecycle(lifecycle::LifecycleCommand),
}

// Both subcommand enums are empty until their modules land.
#[allow(unreachable_code, unused_variables)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vhd { command } => vhd::run(command),
        Command::Lifecycle(command) => lifecycle::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tap-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
