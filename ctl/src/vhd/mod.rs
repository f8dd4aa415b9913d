//! `tap-ctl vhd ...`: offline image tools with vhd-util's verbs and short
//! flags. Thin: every operation is a library function of the engine
//! (`tapjail_image::vhd`) run through `tapjail_ctl::files`; this module
//! parses arguments, prints, and turns errors into messages that name the
//! file and what to do.
//!
//! Every verb that parses an image runs in a confined child
//! (`tapjail_ctl::privsep`): the command line decides which files it may
//! have, and it asks this process for them over a socket.

mod args;
mod confined;
mod errors;
pub mod key;
mod progress;
mod report;
mod write;

use anyhow::{bail, Context, Result};
pub use args::*;
use confined::confined;
use errors::{explain, on};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tapjail_ctl::files as vfs;
use tapjail_ctl::privsep::{self, Grant};
use tapjail_image::vhd::create::CreateKind;
use write::read_input;

const MIB: u64 = 1 << 20;

/// errno of a full filesystem (Linux).
const ENOSPC: i32 = 28;

/// `-s MIB` in bytes, refused here (naming the flag and the range) when
/// no VHD could be that large.
fn mib(size: u64) -> Result<u64> {
    let most = tapjail_image::vhd::MAX_VIRTUAL_SIZE / MIB;
    match size.checked_mul(MIB) {
        _ if size == 0 => {
            bail!("-s 0: the size must be a positive number of MiB (e.g. -s 1024 for 1 GiB)")
        }
        Some(b) if size <= most => Ok(b),
        _ => bail!(
            "-s {size}: a VHD holds at most {most} MiB (2040 GiB); give a size of 1..={most} MiB"
        ),
    }
}

/// What the confined child may have for `command`. Checks made on the
/// command line alone (and reading `write`'s input) happen here, before
/// the fork; nothing here reads an image.
fn grant(command: &VhdCommand) -> Result<Grant> {
    use VhdCommand as C;
    let ro = |p: &PathBuf| (p.clone(), false);
    let rw = |p: &PathBuf| (p.clone(), true);
    let named = |leaf: &PathBuf, parent: &Option<PathBuf>| {
        parent.as_ref().map(|p| (leaf.clone(), p.clone()))
    };
    let arg = |a: &ParentArg| a.parent_path.clone();
    Ok(match command {
        C::Create { .. } | C::ConfineCheck { .. } => Grant::default(),
        C::Snapshot { name, parent, .. } => {
            on(name, vfs::not_own_parent(name, parent))?;
            Grant {
                open: vec![ro(parent)],
                create: Some(name.clone()),
                ..Grant::default()
            }
        }
        C::Query {
            name, parent_path, ..
        } => Grant {
            open: vec![ro(name)],
            named_parent: named(name, parent_path),
            ..Grant::default()
        },
        C::Check {
            name, parent_path, ..
        }
        | C::Read {
            name, parent_path, ..
        } => Grant {
            open: vec![ro(name)],
            named_parent: named(name, &arg(parent_path)),
            ..Grant::default()
        },
        C::Repair { name, .. } | C::Resize { name, .. } => Grant {
            open: vec![rw(name)],
            ..Grant::default()
        },
        C::Write {
            name, parent_path, ..
        } => Grant {
            open: vec![rw(name)],
            named_parent: named(name, &arg(parent_path)),
            ..Grant::default()
        },
        C::Convert {
            src,
            dst,
            parent_path,
            ..
        } => Grant {
            open: vec![ro(src)],
            create: Some(dst.clone()),
            named_parent: named(src, &arg(parent_path)),
            ..Grant::default()
        },
        C::Coalesce {
            name, parent_path, ..
        } => Grant {
            open: vec![ro(name)],
            named_parent: named(name, &arg(parent_path)),
            parent_writable: true,
            ..Grant::default()
        },
        C::SetParent { name, parent, .. } => Grant {
            open: vec![rw(name), ro(parent)],
            ..Grant::default()
        },
        C::Key { name, set, .. } => Grant {
            open: name
                .iter()
                .map(|n| if *set { rw(n) } else { ro(n) })
                .collect(),
            ..Grant::default()
        },
    })
}

/// Run one `tap-ctl vhd` verb; `quiet` hides the progress bar.
pub fn run(command: VhdCommand, quiet: bool) -> Result<ExitCode> {
    if let VhdCommand::Create {
        name,
        size,
        fixed,
        block_size,
    } = command
    {
        // Writes a new image and parses nothing: no child needed.
        let kind = if fixed {
            CreateKind::Fixed
        } else {
            CreateKind::Dynamic { block_size }
        };
        on(&name, vfs::create_path(&name, mib(size)?, &kind))?;
        if !fixed {
            warn_block_size(&name, block_size);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let VhdCommand::Key { .. } = command {
        return run_key(command);
    }
    let grant = grant(&command)?;
    // All of stdin before anything else: all or nothing.
    let input = match &command {
        VhdCommand::Write { length, .. } => {
            Some(read_input(&mut std::io::stdin().lock(), *length)?)
        }
        _ => None,
    };
    // Anything buffered would be written twice, once by each process.
    std::io::stdout().flush().context("writing to stdout")?;
    let code = privsep::run_confined(grant, |paths| {
        match confined(command, paths, input, quiet) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("tap-ctl: {}", crate::render(&e));
                1
            }
        }
    })?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// `tap-ctl vhd key`: the key is read here, the image opened confined.
fn run_key(command: VhdCommand) -> Result<ExitCode> {
    let VhdCommand::Key {
        ref name,
        ref key,
        ref nonce,
        set,
        check,
        print,
        calc,
    } = command
    else {
        unreachable!("run_key runs vhd key only")
    };
    let nonce = nonce.as_deref().map(key::parse_nonce).transpose()?;
    let secret = key.as_deref().map(key::read_key_file).transpose()?;
    if calc {
        let Some(k) = &secret else {
            bail!("vhd key -C needs -k KEYPATH");
        };
        let kh = tapjail_image::vhd::keyhash::make(k, Some(nonce.unwrap_or_default()))?;
        println!("{}", tapjail_image::vhd::keyhash::hex(&kh.hash));
        return Ok(ExitCode::SUCCESS);
    }
    let Some(name) = name.clone() else {
        bail!("vhd key: -n NAME is needed unless -C");
    };
    let op = if set {
        key::KeyOp::Set
    } else if check {
        key::KeyOp::Check
    } else if print {
        key::KeyOp::Print
    } else {
        bail!("vhd key: say what to do: -s (set), -c (check), -p (print) or -C (calculate)");
    };
    if op != key::KeyOp::Print && secret.is_none() {
        bail!("vhd key -s/-c needs -k KEYPATH (the raw key, 32 or 64 bytes; - for stdin)");
    }
    let grant = grant(&command)?;
    std::io::stdout().flush().context("writing to stdout")?;
    let code = privsep::run_confined(grant, |paths| {
        match key::run_in(paths, &name, op, secret.as_ref(), nonce) {
            Ok(out) => {
                print!("{out}");
                let _ = std::io::stdout().flush();
                0
            }
            Err(e) => {
                eprintln!("tap-ctl: {}: {e}", name.display());
                1
            }
        }
    })?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Say when a parent just recorded will not be found by the locator rule.
fn note_outside(child: &Path, parent: &Path) {
    if vfs::parent_outside(child, parent) {
        tracing::warn!(
            image = %child.display(),
            parent = %parent.display(),
            "{} is not beneath the directory of {}: other `tap-ctl vhd` \
             commands use it only when named with --parent {}",
            parent.display(),
            child.display(),
            parent.display()
        );
    }
}

/// Why a block size other than 2 MiB matters (issue 13 item 6).
pub(super) const BLKTAP_BLOCK_SIZE_NOTE: &str =
    "not 2 MiB: blktap's libvhd and tapdisk assume 2 MiB blocks, \
     so blktap cannot use this image (vhd-util check accepts it, then reads go wrong)";

/// Say on stderr that an image just made will not work with blktap.
fn warn_block_size(name: &Path, block_size: u32) {
    if block_size != tapjail_image::vhd::DEFAULT_BLOCK_SIZE {
        tracing::warn!(
            image = %name.display(),
            block_size,
            "{}: block size {block_size} is {BLKTAP_BLOCK_SIZE_NOTE}",
            name.display()
        );
    }
}
