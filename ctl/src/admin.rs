//! `tap-ctl policy check FILE` and `tap-ctl audit verify FILE`: offline
//! checks an administrator runs on the broker's files.

use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use tapjail_policy::Policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; problems are printed as FILE:LINE:COL: message.
    Check {
        /// The policy file (the broker's is /etc/tapjail/policy.toml).
        file: PathBuf,
        /// Print one JSON object: "file", "ok", "tenants", "worker_uids"
        /// [first, last], "socket" (null when invalid), "warnings" and
        /// "errors", each a list of {"line", "column", "message"} (line 0:
        /// no place in the file).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain; names the first broken line.
    /// Rotated files are given oldest first (`audit.jsonl.2 audit.jsonl.1
    /// audit.jsonl`): each must continue the chain of the one before.
    Verify {
        /// The audit log, and its rotated files before it, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print one JSON object: "ok", "files" (each {"file", "lines",
        /// "head" = the last line's SHA-256, "continues" = the previous
        /// file's name or null}), "broken" ({"file", "line", "message"}
        /// or null).
        #[arg(long)]
        json: bool,
    },
}

pub fn policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    let PolicyCommand::Check { file, json } = command;
    let shown = file.display().to_string();
    let text =
        tapjail_common::adminfile::read_text(&file, tapjail_policy::config::MAX_POLICY_BYTES)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the policy file {shown}: {e}; give the path of a readable \
                     policy file (the broker's is /etc/tapjail/policy.toml)"
                )
            })?;
    if json {
        return policy_json(&shown, &text);
    }
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

/// `policy check --json`: the same checks, as one document on stdout.
fn policy_json(shown: &str, text: &str) -> anyhow::Result<ExitCode> {
    let diags = |d: &[tapjail_policy::config::Diagnostic]| -> Vec<serde_json::Value> {
        d.iter()
            .map(|d| serde_json::json!({"line": d.line, "column": d.column, "message": d.message}))
            .collect()
    };
    let v = match Policy::parse(text) {
        Ok(p) => {
            let warnings = Policy::warnings(text, &tapjail_policy::RootProbe::look);
            let range = p.worker_uids;
            let errors: Vec<serde_json::Value> = match tapjail_policy::idmap::clashes(
                &p.id_files,
                range,
                &tapjail_policy::IdFiles::look,
            ) {
                Ok(c) if c.is_empty() => Vec::new(),
                Ok(c) => vec![serde_json::json!({"line": 0, "column": 0,
                        "message": tapjail_policy::idmap::describe(&c, range)})],
                Err(e) => vec![serde_json::json!({"line": 0, "column": 0,
                        "message": format!("cannot check that worker_uids are free: {e}")})],
            };
            serde_json::json!({
                "file": shown,
                "ok": errors.is_empty(),
                "tenants": p.tenants.len(),
                "worker_uids": [range.0, range.1],
                "socket": p.socket.display().to_string(),
                "warnings": diags(&warnings),
                "errors": errors,
            })
        }
        Err(e) => serde_json::json!({
            "file": shown,
            "ok": false,
            "tenants": null,
            "worker_uids": null,
            "socket": null,
            "warnings": [],
            "errors": diags(&e.diagnostics),
        }),
    };
    println!("{v}");
    Ok(if v["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { files, json } = command;
    let mut opened = Vec::new();
    for file in &files {
        let shown = file.display().to_string();
        let f = tapjail_common::adminfile::open_regular(file).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the audit log {shown}: {e}; give the path of the broker's \
                 audit log (audit_log in its policy) or of one of its rotated files"
            )
        })?;
        opened.push((shown, std::io::BufReader::new(f)));
    }
    let several = opened.len() > 1;
    let verified = tapjail_common::audit::verify_files(opened);
    if json {
        let (done, broken) = match &verified {
            Ok(done) => (done.as_slice(), None),
            Err(b) => (
                &[][..],
                Some(serde_json::json!({"file": b.file, "line": b.broken.line,
                    "message": b.broken.message})),
            ),
        };
        let files: Vec<serde_json::Value> = done
            .iter()
            .map(|(f, v)| {
                serde_json::json!({"file": f, "lines": v.lines, "head": v.head,
                    "continues": v.continues.as_ref().map(|c| &c.previous_file)})
            })
            .collect();
        let ok = broken.is_none();
        println!(
            "{}",
            serde_json::json!({"ok": ok, "files": files, "broken": broken})
        );
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    match verified {
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
