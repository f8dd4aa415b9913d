//! `tap-ctl cbt start|checkpoint|stop|list -m MINOR [--name NAME]`:
//! changed-block tracking on a disk (see `tapjail_common::cbt`). The
//! broker decides (policy key `cbt`) and audits every call.

use crate::client::Client;
use clap::{Args, Subcommand};
use std::path::Path;
use std::process::ExitCode;
use tapjail_common::cbt::{CbtInfo, CbtOp, CbtRequest};
use tapjail_common::proto::{Reply, Request};
use tapjail_common::Minor;

#[derive(Debug, Subcommand)]
pub enum CbtCommand {
    /// Start a new, empty bitmap NAME (file LEAF.NAME.cbt next to the image).
    Start(Target),
    /// Clear bitmap NAME: it holds the blocks written from now on.
    Checkpoint(Target),
    /// Stop tracking into NAME (its file is left for a last backup).
    Stop(Target),
    /// Print the disk's bitmaps: name, granularity, dirty blocks.
    List {
        /// The disk's minor.
        #[arg(short = 'm', value_name = "MINOR")]
        minor: Minor,
        /// One JSON array, for machines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct Target {
    /// The disk's minor.
    #[arg(short = 'm', value_name = "MINOR")]
    pub minor: Minor,
    /// The bitmap (NBD clients read it as `qemu:dirty-bitmap:NAME`).
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

impl CbtCommand {
    fn request(self) -> (CbtRequest, bool) {
        let named = |op, t: Target| CbtRequest {
            minor: t.minor,
            op,
            name: Some(t.name),
        };
        match self {
            CbtCommand::Start(t) => (named(CbtOp::Start, t), false),
            CbtCommand::Checkpoint(t) => (named(CbtOp::Checkpoint, t), false),
            CbtCommand::Stop(t) => (named(CbtOp::Stop, t), false),
            CbtCommand::List { minor, json } => (
                CbtRequest {
                    minor,
                    op: CbtOp::List,
                    name: None,
                },
                json,
            ),
        }
    }
}

/// The table `list` prints on a terminal or to a pipe.
fn table(maps: &[CbtInfo]) -> String {
    let mut out = format!(
        "{:<24} {:>11} {:>12} {:>12}\n",
        "name", "granularity", "dirty", "blocks"
    );
    for m in maps {
        out.push_str(&format!(
            "{:<24} {:>11} {:>12} {:>12}\n",
            crate::escape::escape(&m.name),
            m.granularity,
            m.dirty,
            m.blocks
        ));
    }
    out
}

pub fn run(
    cmd: CbtCommand,
    socket: &Path,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let (req, json) = cmd.request();
    let list = req.op == CbtOp::List;
    let client = Client::connect(socket, timeout)?;
    match client.call(&Request::Cbt(req))? {
        Reply::Cbt(maps) if json => println!("{}", serde_json::to_string(&maps)?),
        Reply::Cbt(maps) if list => print!("{}", table(&maps)),
        Reply::Cbt(_) => {}
        Reply::Error { message, .. } => anyhow::bail!(message),
        other => anyhow::bail!("tap-broker answered cbt with {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_name_granularity_and_dirty_count() {
        let t = table(&[CbtInfo {
            name: "daily".into(),
            granularity: 65536,
            dirty: 3,
            blocks: 16,
            xapi_log: false,
        }]);
        let row = t.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols, ["daily", "65536", "3", "16"]);
    }
}
