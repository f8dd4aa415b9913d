//! The command line of `tap-ctl vhd`: vhd-util's verbs and short flags.

use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use tapjail_ctl::files::SourceFormat;
use tapjail_image::vhd::DEFAULT_BLOCK_SIZE;

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
    pub(super) fn get(self) -> Option<SourceFormat> {
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
