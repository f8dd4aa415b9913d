//! `tap-ctl vhd ...`: offline image tools with vhd-util's verbs and short
//! flags. Thin: every operation is a library function of the engine
//! (`tapjail_image::vhd`) run through `tapjail_ctl::files`; this module
//! parses arguments, prints, and turns errors into messages that name the
//! file and what to do.
//!
//! Every verb that parses an image runs in a confined child
//! (`tapjail_ctl::privsep`): the command line decides which files it may
//! have, and it asks this process for them over a socket.

pub mod key;
mod progress;
mod report;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tapjail_ctl::files::{self as vfs, ConvertTarget, Paths, SourceFormat};
use tapjail_ctl::privsep::{self, Grant};
use tapjail_ctl::raw_parent as raw;
use tapjail_image::vhd::create::CreateKind;
use tapjail_image::vhd::DEFAULT_BLOCK_SIZE;
use tapjail_image::{Image, ImageError};

const MIB: u64 = 1 << 20;

/// errno of a full filesystem (Linux).
const ENOSPC: i32 = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Raw,
    Vhd,
}

/// A source image's format, as `-f` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InFormat {
    Raw,
    Vhd,
}

impl From<InFormat> for SourceFormat {
    fn from(f: InFormat) -> Self {
        match f {
            InFormat::Raw => SourceFormat::Raw,
            InFormat::Vhd => SourceFormat::Vhd,
        }
    }
}

/// `--parent PATH`: a parent the locator rule would not find.
#[derive(Debug, Clone, Args)]
pub struct ParentArg {
    /// The parent image, wherever it is (otherwise only relative parent
    /// locators to a file beneath the image's directory are followed).
    #[arg(long = "parent", visible_alias = "parent-path", value_name = "PATH")]
    pub parent_path: Option<PathBuf>,
}

/// `-f raw|vhd`: what the source image is.
#[derive(Debug, Clone, Copy, Args)]
pub struct FormatArg {
    /// The image's format; without it a file showing any sign of a VHD
    /// is opened as one (never silently as raw).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FORMAT")]
    pub source_format: Option<InFormat>,
}

impl FormatArg {
    fn get(self) -> Option<SourceFormat> {
        self.source_format.map(Into::into)
    }
}

#[derive(Debug, Subcommand)]
pub enum VhdCommand {
    /// Create a new image (dynamic unless --fixed).
    Create {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// Virtual size in MiB.
        #[arg(short = 's', long = "size", value_name = "MIB")]
        size: u64,
        /// Allocate all space up front (a fixed VHD).
        #[arg(long)]
        fixed: bool,
        /// Block size in bytes (power of two; dynamic images).
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u32,
    },
    /// Create a differencing child of PARENT.
    Snapshot {
        /// The image (a differencing child).
        #[arg(short = 'n', long = "name", value_name = "CHILD")]
        name: PathBuf,
        /// The parent image the child is based on.
        #[arg(short = 'p', long = "parent", value_name = "PARENT")]
        parent: PathBuf,
        /// Block size in bytes (power of two; blktap uses only 2 MiB).
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// PARENT is a raw disk image, not a VHD (vhd-util snapshot -m);
        /// the child is as large as the file.
        #[arg(short = 'm', long = "raw-parent")]
        raw_parent: bool,
    },
    /// Show what an image is.
    Query {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// Print one JSON object: "file", "virtual_size", "type", "parent",
        /// "parent_resolved", "parent_uuid", "parent_raw", "block_size",
        /// "blktap_compatible_block_size", "allocated_blocks",
        /// "physical_size", "uuid", "creator", "batmap" (sizes in bytes;
        /// null where the image has none); -v, -s and -p are then ignored.
        #[arg(long)]
        json: bool,
        /// Print only the virtual size in MiB (vhd-util -v).
        #[arg(short = 'v', long = "virtual-size")]
        virtual_size: bool,
        /// Print only the physical size in bytes (vhd-util -s).
        #[arg(short = 's', long = "physical-size")]
        physical_size: bool,
        /// Print only the parent (vhd-util -p).
        #[arg(short = 'p', long = "parent")]
        parent: bool,
        /// The parent image, wherever it is (only relative locators
        /// beneath the image's directory are followed otherwise).
        #[arg(long = "parent-path", value_name = "PATH")]
        parent_path: Option<PathBuf>,
    },
    /// Check consistency; exits non-zero and lists every problem found.
    Check {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        #[command(flatten)]
        parent_path: ParentArg,
        /// Print one JSON object: "file", "valid", "problems" (each
        /// {"field", "message", "fix": "repair" | "set-parent" | "none",
        /// "hint"}).
        #[arg(long)]
        json: bool,
    },
    /// Fix footers and batmaps; reports what is left.
    Repair {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// Print one JSON object: "file", "actions" (what was fixed),
        /// "remaining" (problems left, as `check --json` lists them), "ok".
        #[arg(long)]
        json: bool,
    },
    /// Write LENGTH bytes at OFFSET of the virtual disk to stdout.
    Read {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// Where in the virtual disk, in bytes.
        #[arg(short = 'o', long = "offset", value_name = "BYTES")]
        offset: u64,
        /// How many bytes.
        #[arg(short = 'l', long = "length", value_name = "BYTES")]
        length: u64,
        #[command(flatten)]
        source_format: FormatArg,
        #[command(flatten)]
        parent_path: ParentArg,
    },
    /// Write stdin (at most 64 MiB) into the virtual disk at OFFSET, all
    /// or nothing: the whole input is read and checked first, and a write
    /// that fails part-way puts the previous contents back.
    Write {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// Where in the virtual disk, in bytes.
        #[arg(short = 'o', long = "offset", value_name = "BYTES")]
        offset: u64,
        /// Expect exactly this many bytes on stdin; write nothing otherwise.
        #[arg(short = 'l', long = "length", value_name = "BYTES")]
        length: Option<u64>,
        #[command(flatten)]
        source_format: FormatArg,
        #[command(flatten)]
        parent_path: ParentArg,
    },
    /// Convert SRC (raw or VHD: -f, or probed without guessing) into a new
    /// file DST.
    Convert {
        /// Output format.
        #[arg(short = 'O', long = "output-format", value_enum, default_value_t = OutFormat::Raw)]
        format: OutFormat,
        /// With -O vhd: a fixed VHD instead of a dynamic one.
        #[arg(long)]
        fixed: bool,
        /// Block size in bytes (power of two; blktap uses only 2 MiB).
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BLOCK_SIZE)]
        block_size: u32,
        /// Make the output durable (fdatasync) before exiting.
        #[arg(long)]
        sync: bool,
        #[command(flatten)]
        source_format: FormatArg,
        #[command(flatten)]
        parent_path: ParentArg,
        /// The source image.
        src: PathBuf,
        /// The new file to write (must not exist).
        dst: PathBuf,
    },
    /// Merge a differencing image into its parent.
    Coalesce {
        /// The image (a differencing child).
        #[arg(short = 'n', long = "name", value_name = "CHILD")]
        name: PathBuf,
        #[command(flatten)]
        parent_path: ParentArg,
        /// Print one JSON object: "file", "parent", "bytes_merged".
        #[arg(long)]
        json: bool,
    },
    /// Grow an image to SIZE MiB.
    Resize {
        /// The image.
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: PathBuf,
        /// The new virtual size in MiB (only growing).
        #[arg(short = 's', long = "size", value_name = "MIB")]
        size: u64,
    },
    /// Make NEWPARENT the parent of a differencing image.
    SetParent {
        /// The image (a differencing child).
        #[arg(short = 'n', long = "name", value_name = "CHILD")]
        name: PathBuf,
        /// The new parent image.
        #[arg(short = 'p', long = "parent", value_name = "NEWPARENT")]
        parent: PathBuf,
        /// NEWPARENT is a raw disk image, not a VHD (vhd-util modify -m).
        #[arg(short = 'm', long = "raw-parent")]
        raw_parent: bool,
    },
    /// Set (-s), check (-c) or print (-p) the keyhash of blktap's encrypted
    /// VHDs, or calculate one (-C), like `vhd-util key`.
    Key {
        /// The image (dynamic or differencing; not needed with -C).
        #[arg(short = 'n', long = "name", value_name = "PATH")]
        name: Option<PathBuf>,
        /// The key file (32 or 64 raw bytes), `-` for stdin.
        #[arg(short = 'k', long = "key", value_name = "KEYPATH")]
        key: Option<PathBuf>,
        /// The nonce (64 hex digits) for -s or -C; random if not given.
        #[arg(short = 'N', long = "nonce", value_name = "NONCE")]
        nonce: Option<String>,
        /// Set the image's keyhash from the key (the image must be empty).
        #[arg(short = 's', conflicts_with_all = ["check", "calc"])]
        set: bool,
        /// Check the key against the image's keyhash (exit 1 if not).
        #[arg(short = 'c', conflicts_with = "calc")]
        check: bool,
        /// Print the image's nonce and hash (`none` without a keyhash).
        #[arg(short = 'p')]
        print: bool,
        /// Print the keyhash of the key (with -N's nonce) without an image.
        #[arg(short = 'C')]
        calc: bool,
    },
    /// Confine as the image verbs do, then try to open PATH: shows that
    /// the parser can open nothing (exits 0 when the open is refused).
    #[command(hide = true)]
    ConfineCheck {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
}

/// What to tell the user to do about an engine error on `path`.
fn hint(e: &ImageError, path: &Path) -> String {
    let p = path.display();
    match e {
        ImageError::Corrupt {
            field: "footer.cookie" | "footer",
            ..
        } => format!("{p} is not a VHD image (no VHD footer found), or its footer is destroyed"),
        ImageError::Corrupt { .. } => format!(
            "{p} is damaged: run `tap-ctl vhd check -n {p}` to list the problems and \
             `tap-ctl vhd repair -n {p}` to fix what can be fixed"
        ),
        ImageError::Parent(_) | ImageError::ParentUuidMismatch { .. } => format!(
            "the parent of {p} is missing, wrong, or not where tap-ctl looks: put it back, \
             name it with --parent PARENT, or point the image at the right one with \
             `tap-ctl vhd set-parent -n {p} -p PARENT`"
        ),
        ImageError::ParentLoop { .. } | ImageError::ChainTooDeep { .. } => {
            format!("the parent chain of {p} is broken; fix it with `tap-ctl vhd set-parent`")
        }
        ImageError::Io {
            op: "create",
            source,
            ..
        } if source.kind() == std::io::ErrorKind::NotFound => format!(
            "{p} cannot be created: its directory does not exist; create the directory first \
             or give another path"
        ),
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => format!(
            "{p} does not exist: check the path (a relative one starts at the current directory)"
        ),
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            format!(
                "you may not access {p}: check its permissions and its directories', or run \
                 as a user who may"
            )
        }
        ImageError::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
            format!("the filesystem holding {p} is full: free some space and run the command again")
        }
        _ => format!("while working on {p}"),
    }
}

/// Attach the file name and a hint to an engine result.
fn on<T>(path: &Path, r: Result<T, ImageError>) -> Result<T> {
    r.map_err(|e| explain(path, e))
}

/// An engine error on `path`, with the file name and a hint.
fn explain(path: &Path, e: ImageError) -> anyhow::Error {
    match e {
        // Says what is wrong and what to do; only the file may be missing.
        ImageError::InvalidArgument(ref m) if m.contains(&*path.to_string_lossy()) => {
            anyhow::Error::new(e)
        }
        ImageError::InvalidArgument(_) => {
            let p = path.display().to_string();
            anyhow::Error::new(e).context(p)
        }
        e => {
            let h = hint(&e, path);
            with_hint(e, h)
        }
    }
}

/// `e` under the hint `h`. A parent error's message is used without the
/// engine's "parent image:" prefix: the hint already names the parent.
fn with_hint(e: ImageError, h: String) -> anyhow::Error {
    match e {
        ImageError::Parent(m) => anyhow::anyhow!("{h}: {m}"),
        e => anyhow::Error::new(e).context(h),
    }
}

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

/// The body of every image verb, run in the confined child: files come
/// from `paths`. Returns the exit code.
fn confined(
    command: VhdCommand,
    paths: &mut dyn Paths,
    input: Option<Vec<u8>>,
    quiet: bool,
) -> Result<i32> {
    match command {
        VhdCommand::Create { .. } => unreachable!("create runs unconfined"),
        VhdCommand::Key { .. } => unreachable!("vhd key runs in run_key"),
        VhdCommand::ConfineCheck { path } => {
            use std::os::unix::fs::OpenOptionsExt;
            // Both ways a path can be opened: libc's openat, and openat2.
            let std_open = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path);
            let raw = tapjail_ctl::sys::openat2(libc::AT_FDCWD, &path, libc::O_RDONLY, 0);
            let mut refused = true;
            for (how, r) in [("open", std_open.map(drop)), ("openat2", raw.map(drop))] {
                match r {
                    Ok(()) => {
                        refused = false;
                        println!("{how} {}: opened", path.display());
                    }
                    Err(e) => println!("{how} {}: refused: {e}", path.display()),
                }
            }
            return Ok(if refused { 0 } else { 1 });
        }
        VhdCommand::Snapshot {
            name,
            parent,
            block_size,
            raw_parent,
        } => {
            if raw_parent {
                // What is wrong with the parent is said about the parent.
                on(&parent, raw::raw_parent_spec_in(paths, &name, &parent))?;
                on(
                    &name,
                    raw::snapshot_raw_in(paths, &name, &parent, block_size),
                )?;
            } else {
                // What is wrong with the parent is said about the parent;
                // a raw file given without -m is told about -m.
                if let Err(e) = vfs::parent_spec_in(paths, &name, &parent) {
                    if let Some(h) = raw::raw_parent_hint(paths, &parent) {
                        return Err(anyhow::Error::new(e).context(h));
                    }
                    return Err(explain(&parent, e));
                }
                on(&name, vfs::snapshot_in(paths, &name, &parent, block_size))?;
            }
            warn_block_size(&name, block_size);
            note_outside(&name, &parent);
        }
        VhdCommand::Query {
            name,
            json,
            virtual_size,
            physical_size,
            parent,
            parent_path: _,
        } => {
            let info = on(&name, vfs::query_in(paths, &name))?;
            let only = if virtual_size {
                report::QueryOnly::VirtualSize
            } else if physical_size {
                report::QueryOnly::PhysicalSize
            } else if parent {
                report::QueryOnly::Parent
            } else {
                report::QueryOnly::All
            };
            report::query(&name, &info, only, json)?;
        }
        VhdCommand::Check { name, json, .. } => {
            let bar = progress::Progress::new("check", quiet || json);
            let problems = on(
                &name,
                vfs::check_in_with_progress(paths, &name, &mut bar.callback()),
            )?;
            bar.finish();
            if problems.len() == 1 && problems[0].field == "footer.cookie" {
                // No footer anywhere: say so if nothing else looks like a VHD.
                let f = on(&name, paths.open(&name, false))?;
                if on(&name, tapjail_image::vhd::probe::vhd_sign(&f))?.is_none() {
                    bail!(
                        "{} is not a VHD image (no footer, no dynamic header): if it is a raw \
                         disk image there is nothing to check (attach it as aio:PATH); if it \
                         was a VHD, restore it from a copy",
                        name.display()
                    );
                }
            }
            return report::check(&name, &problems, json);
        }
        VhdCommand::Repair { name, json } => {
            let bar = progress::Progress::new("repair", quiet || json);
            let done = on(
                &name,
                vfs::repair_in_with_progress(
                    paths,
                    &name,
                    &mut bar.callback(),
                    &mut bar.phase("repair, verifying"),
                ),
            )?;
            bar.finish();
            return report::repair(&name, &done, json);
        }
        VhdCommand::Read {
            name,
            offset,
            length,
            source_format,
            ..
        } => {
            let img = on(
                &name,
                vfs::open_any_in(paths, &name, source_format.get(), false),
            )?;
            // Refuse a range past the end before writing any of it.
            let size = img.virtual_size();
            if offset.checked_add(length).is_none_or(|end| end > size) {
                bail!(
                    "offset {offset} + length {length} is past the end of {} ({size} bytes); \
                     give -o and -l within the disk (`tap-ctl vhd query -n {}` shows its size)",
                    name.display(),
                    name.display()
                );
            }
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; length.min(4 * MIB) as usize];
            let mut done = 0u64;
            while done < length {
                let n = (length - done).min(buf.len() as u64) as usize;
                on(&name, img.read_at(&mut buf[..n], offset + done))?;
                out.write_all(&buf[..n]).context("writing to stdout")?;
                done += n as u64;
            }
            out.flush().context("writing to stdout")?;
        }
        VhdCommand::Write {
            name,
            offset,
            source_format,
            ..
        } => {
            let data = input.unwrap_or_default();
            let img = on(
                &name,
                vfs::open_any_in(paths, &name, source_format.get(), true),
            )?;
            write_all_or_nothing(img.as_ref(), &name, &data, offset)?;
        }
        VhdCommand::Convert {
            format,
            fixed,
            block_size,
            sync,
            source_format,
            src,
            dst,
            ..
        } => {
            let target = match (format, fixed) {
                (OutFormat::Raw, true) => bail!("--fixed only applies to -O vhd"),
                (OutFormat::Raw, false) => ConvertTarget::Raw,
                (OutFormat::Vhd, true) => ConvertTarget::VhdFixed,
                (OutFormat::Vhd, false) => ConvertTarget::VhdDynamic { block_size },
            };
            let bar = progress::Progress::new("convert", quiet);
            vfs::convert_in(
                paths,
                &src,
                source_format.get(),
                &dst,
                target,
                sync,
                &mut bar.callback(),
            )
            .map_err(|e| {
                // Say which side failed where the error says it.
                let h = match &e {
                    ImageError::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
                        format!(
                            "no space left to write {}: free some space and run the command \
                             again (the partial output was removed)",
                            dst.display()
                        )
                    }
                    ImageError::InvalidArgument(_) => {
                        format!("cannot convert {} to {}", src.display(), dst.display())
                    }
                    _ => hint(&e, &src),
                };
                with_hint(e, h)
            })?;
            if let ConvertTarget::VhdDynamic { block_size } = target {
                warn_block_size(&dst, block_size);
            }
            bar.finish();
        }
        VhdCommand::Coalesce { name, json, .. } => {
            let bar = progress::Progress::new("coalesce", quiet || json);
            let (parent, copied) = on(&name, vfs::coalesce_in(paths, &name, &mut bar.callback()))?;
            bar.finish();
            report::coalesced(&name, &parent, copied, json)?;
        }
        VhdCommand::Resize { name, size } => {
            // Metadata only (tables grow, a few blocks may move): the bar
            // goes from nothing to done.
            let bar = progress::Progress::new("resize", quiet);
            let bytes = mib(size)?;
            bar.callback()(0, bytes);
            on(&name, vfs::resize_in(paths, &name, bytes))?;
            bar.callback()(bytes, bytes);
            bar.finish();
        }
        VhdCommand::SetParent {
            name,
            parent,
            raw_parent,
        } => {
            if raw_parent {
                on(&name, raw::set_raw_parent_in(paths, &name, &parent))?;
            } else {
                on(&parent, vfs::parent_spec_in(paths, &name, &parent))?;
                on(&name, vfs::set_parent_in(paths, &name, &parent))?;
            }
            note_outside(&name, &parent);
        }
    }
    Ok(0)
}

/// Most `tap-ctl vhd write` takes in one go: it holds the input and the
/// range's previous contents in memory to be all-or-nothing.
pub const MAX_WRITE: u64 = 64 * MIB;

/// All of `input` (at most [`MAX_WRITE`] bytes, exactly `expected` if
/// given), before anything is written.
fn read_input(input: &mut impl Read, expected: Option<u64>) -> Result<Vec<u8>> {
    if let Some(l) = expected.filter(|l| *l > MAX_WRITE) {
        bail!(
            "-l {l} is more than tap-ctl vhd write takes at once ({MAX_WRITE} bytes): \
             split the input, or build the image with `tap-ctl vhd convert`; nothing was written"
        );
    }
    let mut data = Vec::new();
    input
        .take(MAX_WRITE + 1)
        .read_to_end(&mut data)
        .context("reading stdin; nothing was written")?;
    let got = data.len() as u64;
    if got > MAX_WRITE {
        bail!(
            "stdin holds more than {MAX_WRITE} bytes, the most tap-ctl vhd write takes at \
             once: split the input, or build the image with `tap-ctl vhd convert`; nothing \
             was written"
        );
    }
    if let Some(l) = expected.filter(|l| *l != got) {
        bail!("stdin held {got} bytes, not the {l} given with -l; nothing was written");
    }
    Ok(data)
}

/// Piece sizes of `tap-ctl vhd write`: writes, and comparisons when
/// putting old contents back.
const WRITE_CHUNK: usize = 4 << 20;
const RESTORE_PIECE: usize = 64 << 10;

/// Put `old` back at `offset`, piece by piece, writing only the pieces that
/// now read differently: a piece the failed write never changed (say, in
/// a block it could not allocate) is not written, so putting back does not
/// need the space that just ran out.
fn restore(img: &dyn Image, old: &[u8], offset: u64) -> Result<(), ImageError> {
    let mut now = vec![0u8; RESTORE_PIECE.min(old.len())];
    for (i, piece) in old.chunks(RESTORE_PIECE).enumerate() {
        let at = offset + (i * RESTORE_PIECE) as u64;
        let cur = &mut now[..piece.len()];
        img.read_at(cur, at)?;
        if cur != piece {
            img.write_at(piece, at)?;
        }
    }
    img.flush()
}

/// Write `data` at `offset` of `img`, all or nothing: the range is checked
/// first, its previous contents saved, and if any write (or the flush)
/// fails they are written back. Only if that fails too may part of
/// `data` remain, and the error says which range to check.
fn write_all_or_nothing(img: &dyn Image, name: &Path, data: &[u8], offset: u64) -> Result<()> {
    let size = img.virtual_size();
    let len = data.len() as u64;
    let Some(end) = offset.checked_add(len).filter(|e| *e <= size) else {
        bail!(
            "offset {offset} + {len} bytes of input is past the end of {} ({size} bytes); \
             nothing was written",
            name.display()
        );
    };
    if data.is_empty() {
        return Ok(());
    }
    let mut old = vec![0u8; data.len()];
    on(name, img.read_at(&mut old, offset))
        .context("reading the range's current contents; nothing was written")?;
    // How far the writes got (the failed one included): only that much
    // can need putting back.
    let mut tried = 0usize;
    let written = (|| {
        for chunk in data.chunks(WRITE_CHUNK) {
            let at = offset + tried as u64;
            tried += chunk.len();
            img.write_at(chunk, at)?;
        }
        img.flush()
    })();
    let Err(e) = written else {
        return Ok(());
    };
    let e = explain(name, e);
    match restore(img, &old[..tried], offset) {
        Ok(()) => Err(e.context(format!(
            "writing {len} bytes at offset {offset} failed; the previous contents were \
             written back, so none of the input was kept"
        ))),
        Err(undo) => Err(e.context(format!(
            "writing {len} bytes at offset {offset} failed, and so did writing the previous \
             contents back ({undo}): bytes {offset}..{end} of {} may hold part of the input",
            name.display()
        ))),
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
