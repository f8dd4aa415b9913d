//! What `/sys/block/nbdN` says about the kernel's nbd devices, and the one
//! queue limit we set there. `sys_block` is `/sys/block` outside tests.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub const SYS_BLOCK: &str = "/sys/block";

pub fn node(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of a `/dev/nbdN` path (as recorded for a successor broker).
pub fn index_of(node: &Path) -> Option<u32> {
    let name = node.to_str()?.strip_prefix("/dev/nbd")?;
    if name.is_empty() || name.starts_with('0') && name.len() > 1 {
        return None;
    }
    name.parse().ok()
}

/// Every nbd device the kernel has, by index, in order.
pub fn devices(sys_block: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(sys_block)
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_prefix("nbd")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Whether the device is connected: the driver shows `pid` only then.
pub fn connected(sys_block: &Path, index: u32) -> bool {
    sys_block.join(format!("nbd{index}/pid")).exists()
}

/// The backend identifier it was connected with, if any.
pub fn backend(sys_block: &Path, index: u32) -> Option<String> {
    std::fs::read_to_string(sys_block.join(format!("nbd{index}/backend")))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Devices connected with exactly `ident` (what a broker that is gone left).
pub fn owned_by(sys_block: &Path, ident: &str) -> Vec<u32> {
    devices(sys_block)
        .into_iter()
        .filter(|&i| connected(sys_block, i) && backend(sys_block, i).as_deref() == Some(ident))
        .collect()
}

/// Cap the requests the kernel builds for this device at `kib` KiB (the
/// worker was told the same maximum).
pub fn set_max_sectors_kb(index: u32, kib: u32) -> io::Result<()> {
    std::fs::write(
        Path::new(SYS_BLOCK).join(format!("nbd{index}/queue/max_sectors_kb")),
        format!("{kib}\n"),
    )
}

/// Check that `/dev/nbdN` is the block device sysfs names (`MAJ:MIN`).
pub fn check_node(index: u32) -> io::Result<PathBuf> {
    let dev = std::fs::read_to_string(Path::new(SYS_BLOCK).join(format!("nbd{index}/dev")))?;
    let (maj, min) = dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| io::Error::other(format!("nbd{index}: unreadable dev {dev:?}")))?;
    let path = node(index);
    let md = std::fs::symlink_metadata(&path)?;
    if !md.file_type().is_block_device() || md.rdev() != libc::makedev(maj, min) {
        return Err(io::Error::other(format!(
            "{} is not block device {maj}:{min}",
            path.display()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_of_accepts_only_canonical_nbd_nodes() {
        assert_eq!(index_of(Path::new("/dev/nbd0")), Some(0));
        assert_eq!(index_of(Path::new("/dev/nbd15")), Some(15));
        for bad in [
            "/dev/nbd",
            "/dev/nbd01",
            "/dev/nbd1p1",
            "/dev/ublkb0",
            "/dev/nbd-1",
        ] {
            assert_eq!(index_of(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn owned_by_finds_only_connected_devices_with_our_identifier() {
        let d = tempfile::tempdir().unwrap();
        let mk = |i: u32, pid: bool, backend: Option<&str>| {
            let dir = d.path().join(format!("nbd{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            if pid {
                std::fs::write(dir.join("pid"), "1\n").unwrap();
            }
            if let Some(b) = backend {
                std::fs::write(dir.join("backend"), format!("{b}\n")).unwrap();
            }
        };
        mk(0, true, Some("tapjail:/s:tapdev1"));
        mk(1, true, Some("tapjail:/s:tapdev10"));
        mk(2, false, Some("tapjail:/s:tapdev1"));
        mk(10, true, Some("tapjail:/s:tapdev1"));
        mk(3, true, None);
        std::fs::create_dir_all(d.path().join("loop0")).unwrap();
        assert_eq!(devices(d.path()), vec![0, 1, 2, 3, 10]);
        assert_eq!(owned_by(d.path(), "tapjail:/s:tapdev1"), vec![0, 10]);
        assert!(connected(d.path(), 3) && !connected(d.path(), 2));
    }
}
