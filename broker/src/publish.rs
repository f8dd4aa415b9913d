//! `device_dir/tapdevN`: the stable name a minor's device is published
//! under, a symlink to the backend's node (or NBD socket).

use crate::error::BrokerError;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use tapjail_common::Minor;

/// Publish `dir/tapdevN` → `node`.
pub fn publish(dir: &Path, minor: Minor, node: &Path) -> Result<PathBuf, BrokerError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| BrokerError::failed(format!("creating {}: {e}", dir.display())))?;
    let link = dir.join(minor.device_name());
    unpublish(&link)?;
    std::os::unix::fs::symlink(node, &link)
        .map_err(|e| BrokerError::failed(format!("creating {}: {e}", link.display())))?;
    Ok(link)
}

/// Remove a published symlink (nothing else).
pub fn unpublish(link: &Path) -> Result<(), BrokerError> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)
            .map_err(|e| BrokerError::failed(format!("removing {}: {e}", link.display()))),
        Ok(_) => Err(BrokerError::failed(format!(
            "{} exists and is not a symlink; not touching it",
            link.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BrokerError::failed(format!("{}: {e}", link.display()))),
    }
}
