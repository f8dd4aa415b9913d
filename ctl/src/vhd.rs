//! `tap-ctl vhd ...`: offline image tools.

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum VhdCommand {}

pub fn run(command: VhdCommand) -> anyhow::Result<ExitCode> {
    match command {}
}
