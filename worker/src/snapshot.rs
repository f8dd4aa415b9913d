//! Online snapshot, the worker's half: write a new child's VHD metadata
//! and make it the leaf while the disk serves.
//!
//! The broker created the child file and re-opened the leaf read-only;
//! both arrive as fds. [`prepare`] runs while I/O carries on: it reads the
//! leaf's chain from the read-only fd (parents through the broker, as for
//! `Open`), writes and syncs the child's metadata (parent UUID, mtime and
//! locators naming the leaf). [`switch`] then holds requests, drains and
//! flushes the old leaf, rereads its metadata (its blocks changed since
//! `prepare`), stacks the child on top and releases the requests: the
//! stall is one drain, one flush and one metadata read.
//!
//! Everything here parses image bytes, which is why it runs in the worker
//! and not in the broker.

use crate::disk::{Disk, DiskError};
use crate::image::vhd::create::{create, CreateKind, ParentSpec};
use crate::image::vhd::footer::VHD_EPOCH;
use crate::image::vhd::locator::LocatorCode;
use crate::image::vhd::{self, VhdImage, VhdLayer, VhdOptions};
use crate::image::{Backing, Image, ImageError, ParentOpener};
use crate::io::{CacheMode, UringFile};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tapjail_common::snapshot::{SnapshotParent, SnapshotStats, MAX_STALL_US};

/// A snapshot made ready by [`prepare`], waiting for [`switch`].
#[derive(Debug)]
pub struct Prepared {
    /// The child, opened writable; becomes the leaf.
    child: VhdLayer,
    child_name: String,
    /// The old leaf's file (read-only), shared so that its layer can be
    /// reopened at the switch.
    leaf_file: Arc<dyn Backing>,
    leaf_name: String,
    /// The old leaf's layer as read at prepare (stale by the switch) and
    /// its parents (which do not change).
    chain: Vec<VhdLayer>,
}

impl Prepared {
    pub fn child_name(&self) -> &str {
        &self.child_name
    }
}

fn uring(fd: OwnedFd, cache: CacheMode, op: &'static str) -> Result<UringFile, ImageError> {
    UringFile::new(fd, cache).map_err(|source| ImageError::Io {
        op,
        offset: 0,
        source,
    })
}

/// Step 1: read the leaf's chain from `leaf_fd`, write the child's
/// metadata into `child_fd` and sync it. `size` is the served disk's
/// virtual size; the child is made exactly as large.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    child_fd: OwnedFd,
    child_name: &str,
    leaf_fd: OwnedFd,
    parent: &SnapshotParent,
    size: u64,
    cache: CacheMode,
    parent_cache: CacheMode,
    parents: &mut dyn ParentOpener,
) -> Result<Prepared, ImageError> {
    // The mtime the child records; the leaf is written to until the
    // switch, so this is the time of the snapshot's start.
    let mtime = tapjail_common::sys::fstat_mtime(leaf_fd.as_fd()).map_err(|e| {
        ImageError::io("fstat of the leaf", 0)(std::io::Error::from_raw_os_error(e))
    })?;
    let leaf_file: Arc<dyn Backing> =
        Arc::new(uring(leaf_fd, parent_cache, "setting up leaf file")?);
    let image: VhdImage = vhd::open(
        Box::new(leaf_file.clone()),
        &parent.absolute,
        true,
        parents,
        VhdOptions::default(),
    )?;
    let chain = image.into_layers();
    let leaf = &chain[0];
    if leaf.virtual_size() != size {
        return Err(ImageError::InvalidArgument(format!(
            "{} has virtual size {} but the disk serves {}: it is not the open leaf",
            parent.absolute,
            leaf.virtual_size(),
            size
        )));
    }
    let block_size = leaf
        .block_size()
        .and_then(|b| u32::try_from(b).ok())
        .unwrap_or(vhd::DEFAULT_BLOCK_SIZE);
    let spec = ParentSpec {
        uuid: leaf.uuid(),
        timestamp: u32::try_from(u64::try_from(mtime).unwrap_or(0).saturating_sub(VHD_EPOCH))
            .unwrap_or(u32::MAX),
        name: parent.name.clone(),
        locators: vec![
            (LocatorCode::W2ru, parent.relative.clone()),
            (LocatorCode::W2ku, parent.absolute.clone()),
            (LocatorCode::MacX, parent.absolute.clone()),
        ],
    };
    let child_file = uring(child_fd, cache, "setting up child file")?;
    // `create` syncs the child before it returns.
    create(
        &child_file,
        size,
        &CreateKind::Differencing {
            block_size,
            parent: spec,
        },
    )?;
    let child = VhdLayer::open(
        Box::new(child_file),
        child_name,
        false,
        VhdOptions::default(),
    )?;
    if child.parent_uuid() != Some(chain[0].uuid()) || child.virtual_size() != size {
        return Err(ImageError::InvalidArgument(
            "the child just written does not read back as a child of the leaf".into(),
        ));
    }
    Ok(Prepared {
        child,
        child_name: child_name.to_string(),
        leaf_file,
        leaf_name: parent.absolute.clone(),
        chain,
    })
}

/// Step 2: switch `disk` to the prepared chain. Returns the new chain's
/// names (leaf first) and how long requests were held. On error the disk
/// serves the old chain, unchanged. The new chain's writes are recorded
/// by `cbt`, the disk's changed-block tracker, as the old chain's were.
pub fn switch(
    disk: &Disk,
    p: Prepared,
    cbt: Arc<crate::cbt::Tracker>,
) -> Result<(Vec<String>, Duration), DiskError> {
    let Prepared {
        child,
        child_name: _,
        leaf_file,
        leaf_name,
        mut chain,
    } = p;
    let mut slot = Some((child, chain.split_off(1)));
    disk.switch(|| {
        let (child, parents) = slot
            .take()
            .ok_or_else(|| ImageError::InvalidArgument("snapshot switched twice".into()))?;
        // Flushed and drained: the leaf's metadata is final now.
        let fresh = VhdLayer::open(
            Box::new(leaf_file.clone()),
            &leaf_name,
            true,
            VhdOptions::default(),
        )?;
        if Some(fresh.uuid()) != child.parent_uuid() {
            return Err(ImageError::ParentUuidMismatch {
                name: leaf_name.clone(),
                expected: vhd::footer::format_uuid(&child.parent_uuid().unwrap_or_default()),
                found: vhd::footer::format_uuid(&fresh.uuid()),
            });
        }
        let mut layers = Vec::with_capacity(parents.len() + 2);
        layers.push(child);
        layers.push(fresh);
        layers.extend(parents);
        let image: Arc<dyn Image> = Arc::new(VhdImage::from_layers(layers)?);
        Ok(crate::cbt::Tracked::wrap(image, cbt))
    })
    .map(|(image, stall)| {
        let names = image.stats().into_iter().map(|l| l.name).collect();
        (names, stall)
    })
}

/// Add one switch's stall to the worker's figures.
pub fn record(stats: &mut SnapshotStats, stall: Duration) {
    let us = u64::try_from(stall.as_micros())
        .unwrap_or(MAX_STALL_US)
        .min(MAX_STALL_US);
    stats.count += 1;
    stats.last_stall_us = us;
    stats.max_stall_us = stats.max_stall_us.max(us);
}
