//! Lifecycle commands: tap-ctl allocate, spawn, attach, open, ... via the broker.

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum LifecycleCommand {}

pub fn run(command: LifecycleCommand) -> anyhow::Result<ExitCode> {
    match command {}
}
