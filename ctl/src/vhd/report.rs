//! What the image verbs print: vhd-util's lines by default, one JSON
//! document with `--json` (keys listed in each verb's `--json` help).
//! Text that comes out of an image (names, creator) is escaped for the
//! terminal; JSON escapes it itself.

use super::{BLKTAP_BLOCK_SIZE_NOTE, MIB};
use crate::escape::escape;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tapjail_image::vhd::check::{Fix, Problem};
use tapjail_image::vhd::info::Info;
use tapjail_image::vhd::repair::RepairReport;

/// Which single value `query` prints (vhd-util's -v, -s, -p), or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryOnly {
    VirtualSize,
    PhysicalSize,
    Parent,
    All,
}

/// `vhd query`. With `json` every key is printed, whatever `only` says.
pub fn query(name: &Path, info: &Info, only: QueryOnly, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&query_json(name, info))?);
        return Ok(());
    }
    match only {
        QueryOnly::VirtualSize => println!("{}", info.virtual_size / MIB),
        QueryOnly::PhysicalSize => println!("{}", info.physical_size),
        QueryOnly::Parent => {
            // As vhd-util query -p: the parent's absolute, resolved
            // path. Names come out of the image: escaped for the terminal.
            let shown = info.parent.as_deref().map(resolved_path);
            println!("{}", escape(shown.as_deref().unwrap_or("none")));
        }
        QueryOnly::All => {
            println!("file: {}", name.display());
            println!("type: {}", info.disk_type.as_str());
            println!(
                "virtual size: {} bytes ({} MiB)",
                info.virtual_size,
                info.virtual_size / MIB
            );
            println!("physical size: {} bytes", info.physical_size);
            if let Some(bs) = info.block_size {
                if bs == u64::from(tapjail_image::vhd::DEFAULT_BLOCK_SIZE) {
                    println!("block size: {bs}");
                } else {
                    println!("block size: {bs} ({})", BLKTAP_BLOCK_SIZE_NOTE);
                }
                println!("allocated blocks: {}", info.allocated_blocks);
                println!("batmap: {}", info.batmap);
            }
            println!("uuid: {}", info.uuid);
            println!("creator: {}", escape(&info.creator));
            if let Some(p) = &info.parent {
                println!("parent: {}", escape(p));
                if info.parent_raw {
                    println!("parent type: raw (null parent uuid)");
                } else {
                    println!(
                        "parent uuid: {}",
                        info.parent_uuid.clone().unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

fn query_json(name: &Path, info: &Info) -> Value {
    json!({
        "file": name.to_string_lossy(),
        "virtual_size": info.virtual_size,
        "type": info.disk_type.as_str(),
        "parent": info.parent,
        "parent_resolved": info.parent.as_deref().map(resolved_path),
        "parent_uuid": info.parent_uuid,
        "parent_raw": info.parent_raw,
        "block_size": info.block_size,
        "blktap_compatible_block_size": info
            .block_size
            .map(|b| b == u64::from(tapjail_image::vhd::DEFAULT_BLOCK_SIZE)),
        "allocated_blocks": info.allocated_blocks,
        "physical_size": info.physical_size,
        "uuid": info.uuid,
        "creator": info.creator,
        "batmap": info.batmap,
    })
}

fn fix_name(f: Fix) -> &'static str {
    match f {
        Fix::Repair => "repair",
        Fix::SetParent => "set-parent",
        Fix::None => "none",
    }
}

fn problems_json(problems: &[Problem]) -> Vec<Value> {
    problems
        .iter()
        .map(|p| {
            json!({
                "field": p.field,
                "message": p.message,
                "fix": fix_name(p.fix()),
                "hint": p.fix_hint(),
            })
        })
        .collect()
}

/// `vhd check`: every problem, and the exit code (1 if any).
pub fn check(name: &Path, problems: &[Problem], json: bool) -> Result<i32> {
    if json {
        let v = json!({
            "file": name.to_string_lossy(),
            "valid": problems.is_empty(),
            "problems": problems_json(problems),
        });
        println!("{v}");
    } else if problems.is_empty() {
        println!("{} is valid", name.display());
    } else {
        for p in problems {
            println!(
                "{}: {} ({})",
                name.display(),
                escape(&p.to_string()),
                p.fix_hint()
            );
        }
    }
    if problems.is_empty() {
        return Ok(0);
    }
    eprintln!(
        "tap-ctl: {} has {} problem(s); {}",
        name.display(),
        problems.len(),
        fix_summary(problems, name)
    );
    Ok(1)
}

/// `vhd repair`: what was done, what is left, and the exit code.
pub fn repair(name: &Path, report: &RepairReport, json: bool) -> Result<i32> {
    let ok = report.remaining.is_empty();
    if json {
        let v = json!({
            "file": name.to_string_lossy(),
            "actions": report.actions,
            "remaining": problems_json(&report.remaining),
            "ok": ok,
        });
        println!("{v}");
        return Ok(if ok { 0 } else { 1 });
    }
    for a in &report.actions {
        println!("{}: {}", name.display(), escape(a));
    }
    if report.actions.is_empty() {
        println!("{}: nothing that repair fixes", name.display());
    }
    for p in &report.remaining {
        println!(
            "{}: repair cannot fix: {} ({})",
            name.display(),
            escape(&p.to_string()),
            p.fix_hint()
        );
    }
    Ok(if ok { 0 } else { 1 })
}

/// `vhd coalesce`: where the data went.
pub fn coalesced(name: &Path, parent: &str, copied: u64, json: bool) -> Result<()> {
    if json {
        let v = json!({
            "file": name.to_string_lossy(),
            "parent": parent,
            "bytes_merged": copied,
        });
        println!("{v}");
    } else {
        println!(
            "{}: merged {copied} bytes into {}",
            name.display(),
            escape(parent)
        );
    }
    Ok(())
}

/// The closing line of `check`: which tools fix what it found.
fn fix_summary(problems: &[Problem], name: &Path) -> String {
    let n = name.display();
    let mut out = Vec::new();
    if problems.iter().any(|p| p.fix() == Fix::Repair) {
        out.push(format!(
            "`tap-ctl vhd repair -n {n}` fixes footers and batmaps"
        ));
    }
    if problems.iter().any(|p| p.fix() == Fix::SetParent) {
        let raw = if problems.iter().any(|p| p.field == "raw parent") {
            " (add -m for a raw parent)"
        } else {
            ""
        };
        out.push(format!(
            "`tap-ctl vhd set-parent -n {n} -p PARENT` points it at its parent{raw}"
        ));
    }
    if problems.iter().any(|p| p.fix() == Fix::None) {
        out.push("the rest no tool fixes without losing data".into());
    }
    out.join("; ")
}

/// `path` made absolute (against the working directory) with `.` and `..`
/// taken out lexically, as `vhd-util query -p` prints a parent. Lexical is
/// exact here: parents are never reached through symlinks.
fn resolved_path(path: &str) -> String {
    use std::path::Component;
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(p),
            Err(_) => p.to_path_buf(),
        }
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out.to_string_lossy().into_owned()
}
