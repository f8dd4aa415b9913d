//! Opening a read cache: the leaf writable (fills go there), its parent
//! chain read-only through the [`ParentOpener`], then the tie between the
//! two checked, and the cache emptied first if the parent changed.
//!
//! The tie is what any differencing child records of its parent: the
//! parent's UUID (null for a raw parent) and its modification time in
//! seconds since 2000. A cache whose record differs from the parent found
//! (another file at the locator, or the same one written since) may hold
//! sectors the parent no longer has, so it is emptied: every BAT entry
//! cleared and made durable, *then* the new tie written (by
//! [`super::super::modify::set_parent`], crash-safe). A crash in between
//! leaves an empty cache with the old tie, emptied again at the next open;
//! never old sectors under a new tie. The cache keeps its own UUID, so
//! children made on it (SM's VM leaves) stay valid.

use super::{Counters, ReadCacheImage};
use crate::vhd::chain;
use crate::vhd::create::ParentSpec;
use crate::vhd::footer::{format_uuid, DiskType, VHD_EPOCH};
use crate::vhd::image::VhdImage;
use crate::vhd::layer::raw::open_raw_parent;
use crate::vhd::layer::{VhdLayer, VhdOptions};
use crate::vhd::locator::LocatorCode;
use crate::vhd::{modify, MAX_CHAIN_DEPTH};
use crate::{Backing, ImageError, ParentOpener};
use std::sync::Arc;

/// A read cache, opened.
#[derive(Debug)]
pub struct Opened {
    pub image: ReadCacheImage,
    /// Why the cache was emptied at this open (`None`: it was kept).
    pub reset: Option<String>,
}

/// Open the read cache `leaf` (named `name`) and its parents; empty it
/// first if its parent changed (see the module doc).
pub fn open(
    leaf: Box<dyn Backing>,
    name: &str,
    opener: &mut dyn ParentOpener,
    options: VhdOptions,
) -> Result<Opened, ImageError> {
    let file: Arc<dyn Backing> = Arc::from(leaf);
    let layer = |f: &Arc<dyn Backing>| VhdLayer::open(Box::new(f.clone()), name, false, options);
    let mut first = layer(&file)?;
    if first.disk_type() != DiskType::Differencing {
        return Err(ImageError::InvalidArgument(format!(
            "-r: {name} is not a differencing VHD, so it has no parent chain to cache; a read \
             cache is a child of the image it caches (SM makes PARENT.vhdcache with \
             `vhd-util snapshot`, tapjail with `tap-ctl vhd snapshot`)"
        )));
    }
    if first.encrypted() {
        return Err(ImageError::InvalidArgument(format!(
            "-r: {name} is encrypted; tapjail's read cache serves plain VHDs only"
        )));
    }
    let recorded_uuid = first.parent_uuid().unwrap_or_default();
    let recorded_ts = first.header().map_or(0, |h| h.parent_timestamp());
    let raw = first.parent_is_raw();
    let (pfile, pname) =
        opener.open_parent(first.name(), &first.parent_locators(), recorded_uuid)?;
    let found_ts = pfile.modified_secs().map(vhd_time);
    let parents: Vec<VhdLayer> = if raw {
        vec![open_raw_parent(&first, pfile, &pname, true)?]
    } else {
        chain::open(pfile, &pname, true, opener, options)?.into_layers()
    };
    if let Some(l) = parents.iter().find(|l| l.encrypted()) {
        return Err(ImageError::InvalidArgument(format!(
            "-r: {} in the cached chain is encrypted; tapjail's read cache serves plain VHDs only",
            l.name()
        )));
    }
    if parents.iter().any(|l| l.uuid() == first.uuid()) {
        return Err(ImageError::ParentLoop { name: pname });
    }
    if parents.len() + 1 > MAX_CHAIN_DEPTH {
        return Err(ImageError::ChainTooDeep {
            name: name.to_string(),
            max: MAX_CHAIN_DEPTH,
        });
    }
    let found_uuid = if raw { [0; 16] } else { parents[0].uuid() };
    let reset = match found_ts {
        None => Some(format!(
            "the modification time of its parent {pname} is unknown"
        )),
        Some(ts) if ts != recorded_ts || found_uuid != recorded_uuid => Some(format!(
            "its parent {pname} changed (recorded UUID {} time {recorded_ts}, found UUID {} time {ts})",
            format_uuid(&recorded_uuid),
            format_uuid(&found_uuid)
        )),
        Some(_) => None,
    };
    if reset.is_some() {
        let spec = tie(&first, found_uuid, found_ts.unwrap_or(0))?;
        let (table, entries) = first
            .header()
            .map(|h| (h.table_offset(), h.max_table_entries()))
            .ok_or_else(|| ImageError::InvalidArgument(format!("{name}: no dynamic header")))?;
        drop(first);
        empty(file.as_ref(), table, entries)?;
        modify::set_parent(file.as_ref(), &spec)?;
        first = layer(&file)?;
    }
    let mut layers = vec![first];
    layers.extend(parents);
    let chain = VhdImage::from_layers(layers)?;
    let counters = Arc::new(Counters::default());
    *super::lock(&counters.reset) = reset.clone();
    Ok(Opened {
        image: ReadCacheImage { chain, counters },
        reset,
    })
}

/// Seconds since the Unix epoch as a VHD timestamp (seconds since 2000).
fn vhd_time(unix: i64) -> u32 {
    u32::try_from(u64::try_from(unix).unwrap_or(0).saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// The new tie: the parent found, with the cache's own name and locators.
fn tie(first: &VhdLayer, uuid: [u8; 16], timestamp: u32) -> Result<ParentSpec, ImageError> {
    let code = |s: &str| {
        [LocatorCode::W2ru, LocatorCode::W2ku, LocatorCode::MacX]
            .into_iter()
            .find(|c| c.as_str() == s)
    };
    let locators = first
        .parent_locators()
        .into_iter()
        .filter_map(|l| Some((code(&l.code)?, l.path)))
        .collect();
    Ok(ParentSpec {
        uuid,
        timestamp,
        name: first
            .header()
            .and_then(|h| h.parent_name())
            .unwrap_or_default(),
        locators,
    })
}

/// Clear every BAT entry and make that durable: no block of the cache is
/// reachable afterwards (their space is reused by later fills).
fn empty(file: &dyn Backing, table: u64, entries: u32) -> Result<(), ImageError> {
    const UNUSED: [u8; 4096] = [0xFF; 4096];
    let len = u64::from(entries) * 4;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(UNUSED.len() as u64);
        file.write_all_at(&UNUSED[..n as usize], table + done)
            .map_err(ImageError::io("write BAT", table + done))?;
        done += n;
    }
    file.sync_data().map_err(ImageError::io("fsync", 0))
}
