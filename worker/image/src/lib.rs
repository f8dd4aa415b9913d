//! The image engine: every disk format tapjail serves, behind one trait.
//!
//! The engine parses untrusted bytes, so it runs in the confined worker
//! and in the confined offline `tap-ctl vhd` tools, never in the broker.
//! It is a crate of its own so that `tap-ctl` links it without the worker's
//! sandbox, io_uring and frontends. It never opens a path by itself: files
//! arrive as [`Backing`] objects and parents of a differencing chain are
//! obtained through a [`ParentOpener`], which offline is the filesystem and
//! under the broker is a policy-checked request over the control socket.

pub mod backing;
pub mod direct;
pub mod error;
pub mod memory;
pub mod raw;
pub mod stats;
pub mod vhd;
pub mod zeroes;

pub use backing::Backing;
pub use direct::{DirectFile, Mapping, Segment, SyncFiles, Target};
pub use error::ImageError;

/// Sector size of every image format we speak, and the unit of the stats.
pub const SECTOR_SIZE: u64 = 512;

/// What one stretch of the virtual disk holds, as NBD `base:allocation`
/// and `qemu-img map` want to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset that share this status (> 0).
    pub len: u64,
    /// Backed by data somewhere in the chain (false: a hole).
    pub allocated: bool,
    /// Known to read as zeroes (always true for a hole).
    pub zero: bool,
}

/// Per-layer counters, leaf first, as blktap's `stats` reports `images`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Name the layer was opened under (path as the opener knew it).
    pub name: String,
    /// `vhd` or `aio`, as tap-ctl's TYPE.
    pub driver: &'static str,
    /// Sectors read from / written to this layer.
    pub hits: [u64; 2],
    /// Failed read / write requests on this layer.
    pub fail: [u64; 2],
}

/// One disk image (or a whole chain of them), seen as a flat virtual disk.
///
/// All methods take `&self` so that a frontend can serve several requests
/// at once from several threads; implementations do their own locking.
/// Offsets and lengths are in bytes and need not be sector aligned:
/// partial sectors are handled by read-modify-write inside the image.
pub trait Image: Send + Sync + std::fmt::Debug {
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Whether writes are refused (opened `-R`, or a format that cannot be written).
    fn read_only(&self) -> bool;

    /// Fill `buf` from `offset`. Unallocated ranges read as the parent's
    /// data, or zeroes at the root of the chain.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;

    /// Fill `buf` from `offset` only if no step has to wait for a device:
    /// the mapping is known in memory and the data is in the page cache.
    /// Returns `false` (and leaves `buf` unspecified) when it would have
    /// to wait or fails in any way; the caller then uses
    /// [`Image::read_at`] on a thread that may block. A frontend uses this
    /// to answer cache hits on the thread that received the request,
    /// without handing it to another thread. Default: never.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        let _ = (buf, offset);
        false
    }

    /// Write `buf` at `offset`, allocating blocks as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError>;

    /// Make every write that returned before this call durable.
    fn flush(&self) -> Result<(), ImageError>;

    /// The range's contents become unspecified (we make them read as zero
    /// where we can cheaply), and its space may be given back.
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError>;

    /// The range reads as zeroes afterwards. `may_unmap` allows doing it by
    /// deallocating, as NBD's WRITE_ZEROES without NO_HOLE.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError>;

    /// Status of the bytes starting at `offset`, at most `len` of them.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError>;

    /// Counters per layer, leaf first.
    fn stats(&self) -> Vec<LayerStats>;

    /// The files [`Image::map_direct`] mappings point into, by index.
    /// Empty (the default) when the image offers no direct mappings.
    fn direct_files(&self) -> Vec<DirectFile> {
        Vec::new()
    }

    /// Where `len` bytes at `offset` live, when the request can be served
    /// by plain positioned reads (`write` false) or writes on
    /// [`Image::direct_files`] with no metadata change at all, decided from
    /// metadata in memory without doing I/O. `None` (the default) means:
    /// use [`Image::read_at`] / [`Image::write_at`]. See [`direct`] for what
    /// keeps a mapping valid while its I/O runs.
    fn map_direct(&self, _offset: u64, _len: u64, _write: bool) -> Option<Mapping> {
        None
    }

    /// Account a mapping's I/O in the layer counters once it is done
    /// (`ok`: every piece transferred in full).
    fn direct_done(&self, _mapping: &Mapping, _ok: bool) {}

    /// Which [`Image::direct_files`] a flush must `fdatasync`, when that
    /// alone makes every completed write durable; `None` (the default)
    /// means: call [`Image::flush`].
    fn direct_sync(&self) -> Option<SyncFiles> {
        None
    }

    /// The VHD chain underneath, for an online coalesce that copies
    /// between its layers; wrappers forward it. `None` (the default) for
    /// anything else.
    fn vhd(&self) -> Option<&vhd::VhdImage> {
        None
    }
}

/// Where a differencing image says its parent is, as read from the child.
/// Untrusted: it came out of an image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// `W2ku` (absolute Windows-style path), `W2ru` (relative), `MacX`
    /// (file URL), or `name` for the dynamic header's parent unicode name.
    pub code: String,
    /// The decoded path, `/`-separated.
    pub path: String,
    /// Relative to the child's directory.
    pub relative: bool,
}

/// Opens the parent of a differencing image on the engine's behalf.
///
/// Offline this resolves locators on the filesystem (relative ones against
/// the child's directory); in a confined worker it asks the broker, which
/// resolves, policy-checks and audits, and passes back an fd.
pub trait ParentOpener {
    /// Open the parent of the layer named `child` (the name it was opened
    /// under). Returns the parent's file and the name it was opened under.
    /// The engine checks the parent's UUID itself.
    fn open_parent(
        &mut self,
        child: &str,
        locators: &[ParentLocator],
        parent_uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError>;
}

/// Open an image (and for VHD, its whole parent chain) as one [`Image`].
/// Parents are always opened read-only.
pub fn open_chain(
    kind: tapjail_common::proto::ImageKind,
    leaf: Box<dyn Backing>,
    name: &str,
    read_only: bool,
    opener: &mut dyn ParentOpener,
) -> Result<std::sync::Arc<dyn Image>, ImageError> {
    open_chain_keyed(kind, leaf, name, read_only, opener, None)
}

/// [`open_chain`] as a worker serves it: with `open -E`'s key, blktap's
/// encrypted VHDs are decrypted and encrypted ([`vhd::crypt`]); without
/// one, a chain with an encrypted member is refused (tapdisk refuses it
/// too), so no ciphertext is ever served as the disk's data.
pub fn open_chain_keyed(
    kind: tapjail_common::proto::ImageKind,
    leaf: Box<dyn Backing>,
    name: &str,
    read_only: bool,
    opener: &mut dyn ParentOpener,
    key: Option<&tapjail_common::secret::Secret>,
) -> Result<std::sync::Arc<dyn Image>, ImageError> {
    match kind {
        tapjail_common::proto::ImageKind::Aio => {
            if key.is_some() {
                return Err(ImageError::InvalidArgument(format!(
                    "{name}: an encryption key (-E) was given for a raw (aio) image; \
                     blktap encrypts VHDs only: open it without -E"
                )));
            }
            Ok(std::sync::Arc::new(raw::RawImage::open(
                leaf, name, read_only,
            )?))
        }
        tapjail_common::proto::ImageKind::Vhd => {
            let img = vhd::chain::open_keyed(
                leaf,
                name,
                read_only,
                opener,
                vhd::VhdOptions::default(),
                key,
            )?;
            if key.is_none() {
                if let Some(l) = img.layers().iter().find(|l| l.encrypted()) {
                    return Err(ImageError::InvalidArgument(format!(
                        "{} is encrypted (its batmap header carries blktap's keyhash) and no key \
                         was given: open it with -E and the key on stdin",
                        l.name()
                    )));
                }
            }
            Ok(std::sync::Arc::new(img))
        }
    }
}

/// The kind of an image file from its bytes, without guessing in the
/// dangerous direction: any sign of a VHD ([`vhd::probe::vhd_sign`]) makes
/// it `vhd` (which then opens or is refused), and only a file with none is
/// raw (`aio`).
pub fn detect_kind(file: &dyn Backing) -> Result<tapjail_common::proto::ImageKind, ImageError> {
    Ok(if vhd::probe::vhd_sign(file)?.is_some() {
        tapjail_common::proto::ImageKind::Vhd
    } else {
        tapjail_common::proto::ImageKind::Aio
    })
}
