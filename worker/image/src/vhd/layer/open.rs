//! Opening a layer: its metadata read and checked, its tables loaded
//! within the memory budget, and an end footer a kill cut restored.

use super::{
    budget, encrypted_error, lock, AllocState, BatmapDisk, Sparse, VhdLayer, VhdOptions,
    BITMAP_SHARDS,
};
use crate::stats::LayerCounters;
use crate::vhd::bat::UNUSED;
use crate::vhd::batmap::{self};
use crate::vhd::bitmap;
use crate::vhd::footer::{DiskType, FOOTER_SIZE};
use crate::vhd::layout::{BatmapState, Metadata};
use crate::{Backing, ImageError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

impl VhdLayer {
    /// Parse and validate `file` as a VHD.
    pub fn open(
        file: Box<dyn Backing>,
        name: &str,
        read_only: bool,
        options: VhdOptions,
    ) -> Result<VhdLayer, ImageError> {
        let meta = Metadata::read(file.as_ref())?;
        Self::from_metadata(file, name, read_only, options, meta)
    }

    /// [`Self::open`] with blktap's encryption: a layer whose batmap
    /// carries a keyhash needs `key`, checked against it, and is then read
    /// and written through its cipher. A layer without a keyhash is plain;
    /// `must_be_keyed` (the leaf, when a key was given) refuses that, as
    /// tapdisk does.
    pub fn open_keyed(
        file: Box<dyn Backing>,
        name: &str,
        read_only: bool,
        options: VhdOptions,
        key: &tapjail_common::secret::Secret,
        must_be_keyed: bool,
    ) -> Result<VhdLayer, ImageError> {
        let meta = Metadata::read(file.as_ref())?;
        let keyhash = meta.sparse.as_ref().and_then(|s| s.keyhash);
        let cipher = match keyhash {
            Some(k) => Some(crate::vhd::crypt::cipher_for(name, &k, key)?),
            None if must_be_keyed => {
                return Err(ImageError::InvalidArgument(format!(
                "{name} has no keyhash in its batmap header but an encryption key was given (-E): \
                     it is not an encrypted VHD; open it without -E, or set its key with \
                     `tap-ctl vhd key -s` while it is still empty"
            )))
            }
            None => None,
        };
        let cut = !meta.end_footer_ok;
        let mut layer = Self::from_metadata_inner(file, name, true, options, meta)?;
        layer.read_only = read_only;
        layer.cipher = cipher;
        if cut {
            layer.restore_end_footer()?;
        }
        Ok(layer)
    }

    pub(crate) fn from_metadata(
        file: Box<dyn Backing>,
        name: &str,
        read_only: bool,
        options: VhdOptions,
        meta: Metadata,
    ) -> Result<VhdLayer, ImageError> {
        let encrypted = meta.sparse.as_ref().is_some_and(|s| s.encrypted);
        if encrypted && !read_only {
            return Err(encrypted_error(name));
        }
        let cut = !meta.end_footer_ok;
        let layer = Self::from_metadata_inner(file, name, read_only, options, meta)?;
        if cut {
            layer.restore_end_footer()?;
        }
        Ok(layer)
    }

    /// Put a footer at the end of the file again when a writer was killed
    /// between extending the file for a new block and writing the footer
    /// after it: the copy at offset 0 served this open, but a clean close
    /// would otherwise leave a file `check` flags and only `repair` fixes
    /// (the next allocation rewrites it, but a disk may never allocate
    /// again). As repair does, never over or below bytes the file holds.
    fn restore_end_footer(&self) -> Result<(), ImageError> {
        let Some(s) = self.sparse.as_ref().filter(|_| !self.read_only) else {
            return Ok(());
        };
        let mut alloc = lock(&s.alloc);
        let end = alloc.data_end.max(alloc.file_len.next_multiple_of(512));
        self.file
            .write_all_at(&self.footer_bytes, end)
            .map_err(ImageError::io("write footer", end))?;
        self.sync()?;
        alloc.file_len = end + FOOTER_SIZE as u64;
        Ok(())
    }

    fn from_metadata_inner(
        file: Box<dyn Backing>,
        name: &str,
        read_only: bool,
        options: VhdOptions,
        meta: Metadata,
    ) -> Result<VhdLayer, ImageError> {
        let footer_bytes = meta.footer.to_bytes();
        let encrypted = meta.sparse.as_ref().is_some_and(|s| s.encrypted);
        let sparse = match meta.sparse {
            None => None,
            Some(s) => {
                let n = s.bat.len();
                let (memory, cache_per_shard) = budget::reserve(name, &s)?;
                let full: Vec<AtomicU64> = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
                let hinted: Vec<AtomicU64> =
                    (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
                let sum_len = batmap::checksum_len(meta.footer.current_size());
                let (batmap, batmap_bits) = match &s.batmap {
                    BatmapState::Valid { header, map } => {
                        let bits = (n as u64).min(sum_len * 8).min(map.len() as u64 * 8);
                        for (b, &e) in s.bat.iter().enumerate().take(bits as usize) {
                            if e != UNUSED && bitmap::test(map, b) {
                                full[b / 64].fetch_or(1 << (b % 64), Ordering::Relaxed);
                                hinted[b / 64].fetch_or(1 << (b % 64), Ordering::Relaxed);
                            }
                        }
                        (
                            Some(BatmapDisk {
                                header_offset: s.batmap_header_offset,
                                header: Mutex::new(*header),
                                sum_len,
                            }),
                            bits,
                        )
                    }
                    _ => (None, 0),
                };
                Some(Sparse {
                    block_size: u64::from(s.block_size),
                    block_shift: s.block_size.trailing_zeros(),
                    bitmap_bytes: u64::from(s.bitmap_bytes),
                    sectors_per_block: (s.block_size / 512) as usize,
                    differencing: meta.footer.disk_type == DiskType::Differencing,
                    header: s.header,
                    bat: RwLock::new(s.bat),
                    full,
                    hinted,
                    batmap_bits,
                    batmap,
                    batmap_dirty: AtomicBool::new(false),
                    pending_bat: Mutex::new(Vec::new()),
                    bitmaps: (0..BITMAP_SHARDS)
                        .map(|_| Mutex::new(HashMap::new()))
                        .collect(),
                    cache_per_shard,
                    _memory: memory,
                    alloc: Mutex::new(AllocState {
                        data_end: s.data_end,
                        file_len: meta.file_len,
                    }),
                })
            }
        };
        Ok(VhdLayer {
            file,
            name: name.to_string(),
            footer_bytes,
            virtual_size: meta.virtual_size,
            footer: meta.footer,
            read_only,
            encrypted,
            cipher: None,
            options,
            sparse,
            raw: false,
            counters: LayerCounters::default(),
        })
    }
}
