//! Changed-block tracking: which 64 KiB blocks of the disk were written
//! since a checkpoint, for incremental backup.
//!
//! One engine serves both ways out: named bitmaps (`tap-ctl cbt`, offered
//! over NBD as `qemu:dirty-bitmap:NAME`) and blktap's CBT log (`open -C`,
//! `unpause -c`), because both are the same file format ([`log`]). The
//! broker opens each file in the tenant's root with the tenant's
//! credentials and hands the fd over; only the worker parses it.
//! Every write path of the disk passes through [`Tracked`], which marks the
//! blocks durably before the data is written ([`bitmap`]).

pub mod bitmap;
pub mod control;
pub mod log;
pub mod tracked;

#[cfg(test)]
mod tests;

pub use bitmap::{Bitmap, BitmapError, LogStore, Origin};
pub use tracked::Tracked;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

pub use tapjail_common::cbt::valid_name;

/// The bitmaps of one disk. Kept by the worker across pause, unpause and
/// image swaps; the disk's image is wrapped in [`Tracked`] with it.
#[derive(Debug, Default)]
pub struct Tracker {
    maps: RwLock<Vec<Arc<Bitmap>>>,
    /// Any bitmap at all: a write checks this one flag when none is.
    any: AtomicBool,
}

/// Why a tracker operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    #[error("a bitmap named {0:?} is tracked already")]
    Exists(String),
    #[error("no bitmap named {0:?}")]
    Missing(String),
    #[error("bitmap name {0:?} is not 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadName(String),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error("checkpoint of bitmap {name:?}: {source}")]
    Checkpoint {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl Tracker {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Bitmap>>> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Bitmap>>> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark `[offset, offset + len)` in every bitmap, durably.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.any.load(SeqCst) {
            return Ok(());
        }
        for map in self.read().iter() {
            map.mark(offset, len)?;
        }
        Ok(())
    }

    /// A write to the range needs no marking in any bitmap.
    pub fn covered(&self, offset: u64, len: u64) -> bool {
        !self.any.load(SeqCst) || self.read().iter().all(|m| m.covered(offset, len))
    }

    pub fn add(&self, map: Bitmap) -> Result<(), CbtError> {
        let mut maps = self.write();
        if maps.iter().any(|m| m.name() == map.name()) {
            return Err(CbtError::Exists(map.name().to_string()));
        }
        maps.push(Arc::new(map));
        self.any.store(true, SeqCst);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<Arc<Bitmap>, CbtError> {
        let mut maps = self.write();
        let i = maps
            .iter()
            .position(|m| m.name() == name)
            .ok_or_else(|| CbtError::Missing(name.to_string()))?;
        let map = maps.remove(i);
        self.any.store(!maps.is_empty(), SeqCst);
        Ok(map)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Bitmap>> {
        self.read().iter().find(|m| m.name() == name).cloned()
    }

    pub fn by_id(&self, id: u64) -> Option<Arc<Bitmap>> {
        self.read().iter().find(|m| m.id() == id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Bitmap>> {
        self.read().clone()
    }

    /// Drop every bitmap (the disk closed).
    pub fn clear(&self) {
        self.write().clear();
        self.any.store(false, SeqCst);
    }
}
