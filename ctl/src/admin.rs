//! `tap-ctl policy check FILE` and `tap-ctl audit verify FILE`: offline
//! checks an administrator runs on the broker's files.

use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use tapjail_policy::Policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; problems are printed as FILE:LINE:COL: message.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain; names the first broken line.
    /// Rotated files are given oldest first (`audit.jsonl.2 audit.jsonl.1
    /// audit.jsonl`): each must continue the chain of the one before.
    Verify {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

pub fn policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Check { file } = command;
    let shown = file.display().to_string();
    let text =
        tapjail_common::adminfile::read_text(&file, tapjail_policy::config::MAX_POLICY_BYTES)
            .map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    match Policy::parse(&text) {
        Ok(p) => {
            let warnings = Policy::warnings(&text, &tapjail_policy::RootProbe::look);
            eprint!("{}", tapjail_policy::render_warnings(&warnings, &shown));
            let range = p.worker_uids;
            match tapjail_policy::idmap::clashes(&p.id_files, range, &tapjail_policy::IdFiles::look)
            {
                Ok(c) if c.is_empty() => {}
                Ok(c) => {
                    eprintln!("{shown}: {}", tapjail_policy::idmap::describe(&c, range));
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => {
                    eprintln!("{shown}: cannot check that worker_uids are free: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            println!(
                "{shown}: ok ({} tenant(s), worker uids {}..={}, socket {})",
                p.tenants.len(),
                p.worker_uids.0,
                p.worker_uids.1,
                p.socket.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprint!("{}", e.render(&shown));
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { files } = command;
    let mut opened = Vec::new();
    for file in &files {
        let shown = file.display().to_string();
        let f = tapjail_common::adminfile::open_regular(file)
            .map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
        opened.push((shown, std::io::BufReader::new(f)));
    }
    let several = opened.len() > 1;
    match tapjail_common::audit::verify_files(opened) {
        Ok(done) => {
            for (i, (shown, v)) in done.iter().enumerate() {
                let link = match (&v.continues, i) {
                    (Some(c), 0) => format!(
                        "; continues {} (last hash {}), not checked: give that file first to check the link",
                        crate::escape::escape(&c.previous_file),
                        c.previous_last_hash
                    ),
                    (Some(_), _) => "; continues the file before it".to_string(),
                    (None, _) => String::new(),
                };
                println!(
                    "{shown}: ok, {} line(s), chain intact; last line's SHA-256 {}{link}",
                    v.lines, v.head
                );
            }
            if several {
                println!("{} file(s): one unbroken chain", done.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(b) => {
            eprintln!(
                "{}: chain broken at line {}: {}",
                b.file, b.broken.line, b.broken.message
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
