//! Opening a differencing chain: each parent comes from a [`ParentOpener`]
//! (the filesystem offline, the broker in a confined worker), is opened
//! read-only, and must carry the UUID its child recorded. Loops and chains
//! deeper than [`MAX_CHAIN_DEPTH`] are refused. A child with a null parent
//! UUID has a raw parent ([`super::layer::raw`]), which ends the chain.

use super::footer::{format_uuid, DiskType};
use super::image::VhdImage;
use super::layer::raw::open_raw_parent;
use super::layer::{VhdLayer, VhdOptions};
use super::MAX_CHAIN_DEPTH;
use crate::{Backing, ImageError, ParentOpener};
use std::collections::HashSet;
use tapjail_common::secret::Secret;

/// Open `leaf` and all its parents.
pub fn open(
    leaf: Box<dyn Backing>,
    name: &str,
    read_only: bool,
    opener: &mut dyn ParentOpener,
    options: VhdOptions,
) -> Result<VhdImage, ImageError> {
    open_keyed(leaf, name, read_only, opener, options, None)
}

/// [`open`] with blktap's encryption key (`open -E`): the leaf must carry
/// a keyhash matching `key`, and so must every parent that carries one
/// (see [`super::crypt`]); parents without a keyhash are plain.
pub fn open_keyed(
    leaf: Box<dyn Backing>,
    name: &str,
    read_only: bool,
    opener: &mut dyn ParentOpener,
    options: VhdOptions,
    key: Option<&Secret>,
) -> Result<VhdImage, ImageError> {
    let open_layer = |file, name: &str, read_only, leaf| match key {
        Some(k) => VhdLayer::open_keyed(file, name, read_only, options, k, leaf),
        None => VhdLayer::open(file, name, read_only, options),
    };
    let first = open_layer(leaf, name, read_only, true)?;
    let mut seen = HashSet::from([first.uuid()]);
    let mut layers = vec![first];
    loop {
        let cur = &layers[layers.len() - 1];
        if cur.disk_type() != DiskType::Differencing {
            break;
        }
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(ImageError::ChainTooDeep {
                name: cur.name().to_string(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        let expected = cur.parent_uuid().unwrap_or_default();
        let locators = cur.parent_locators();
        let (file, pname) = opener.open_parent(cur.name(), &locators, expected)?;
        if cur.parent_is_raw() {
            // The root of the chain: a raw file has no parent and no UUID.
            let parent = open_raw_parent(cur, file, &pname, true)?;
            layers.push(parent);
            break;
        }
        let parent = open_layer(file, &pname, true, false).map_err(|e| match e {
            ImageError::Corrupt { .. } | ImageError::Io { .. } => {
                ImageError::Parent(format!("{pname}: {e}"))
            }
            other => other,
        })?;
        if parent.uuid() != expected {
            return Err(ImageError::ParentUuidMismatch {
                name: pname,
                expected: format_uuid(&expected),
                found: format_uuid(&parent.uuid()),
            });
        }
        if !seen.insert(parent.uuid()) {
            return Err(ImageError::ParentLoop { name: pname });
        }
        // A writable child of an encrypted parent would hold plaintext
        // next to ciphertext: tapdisk encrypts the whole chain.
        if parent.encrypted() && parent.cipher().is_none() && !read_only {
            return Err(super::layer::encrypted_error(&pname));
        }
        layers.push(parent);
    }
    VhdImage::from_layers(layers)
}
