//! `open -r` in the worker: when the broker's cache plan asks for it, the
//! image is opened as a read cache of its parent chain
//! ([`crate::image::vhd::read_cache`]) instead of a plain chain, and its
//! hits and misses are kept for `stats`. The plan lasts until `Close`, so
//! an `Unpause` reopens the same way.

use crate::image::vhd::read_cache::{self, Counters};
use crate::image::{Image, ImageError, ParentOpener};
use crate::io::{CacheMode, UringFile};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use tapjail_common::proto::ImageKind;
use tapjail_common::read_cache::ReadCacheStats;

/// Whether this disk is a read cache, and its counters once open.
#[derive(Debug, Default)]
pub struct ReadCache {
    on: bool,
    counters: Mutex<Option<Arc<Counters>>>,
}

impl ReadCache {
    /// From the broker's `Cache` plan (before `Open`).
    pub fn set(&mut self, on: bool) {
        self.on = on;
    }

    pub fn on(&self) -> bool {
        self.on
    }

    /// `Close`: the next `Open` states its own plan.
    pub fn clear(&mut self) {
        self.on = false;
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Open `leaf` as a read cache (the plan says so). The leaf fd is
    /// writable (fills go there) whatever `read_only` says: the image
    /// served is read-only either way.
    pub fn open(
        &self,
        kind: ImageKind,
        leaf: OwnedFd,
        name: &str,
        cache: CacheMode,
        parents: &mut dyn ParentOpener,
        key: Option<&tapjail_common::secret::Secret>,
    ) -> Result<Arc<dyn Image>, ImageError> {
        if kind != ImageKind::Vhd {
            return Err(ImageError::InvalidArgument(format!(
                "-r: {name} is a raw (aio) image; a read cache is a differencing VHD over the image it caches"
            )));
        }
        if key.is_some() {
            return Err(ImageError::InvalidArgument(
                "-r with -E: tapjail's read cache serves plain VHDs only".into(),
            ));
        }
        let file = UringFile::new(leaf, cache).map_err(|source| ImageError::Io {
            op: "setting up image file",
            offset: 0,
            source,
        })?;
        let opened = read_cache::open(Box::new(file), name, parents, Default::default())?;
        if let Some(why) = &opened.reset {
            tracing::warn!(image = %name, "read cache {name} emptied: {why}");
        }
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = Some(opened.image.counters());
        Ok(Arc::new(opened.image))
    }

    /// For `stats` (`None` unless the open disk is a read cache).
    pub fn stats(&self) -> Option<ReadCacheStats> {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.snapshot())
    }
}
