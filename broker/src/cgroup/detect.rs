//! Finding cgroup v2 on this host, read-only: the cgroup2 mount (from
//! `/proc/self/mountinfo`), the broker's own cgroup (`/proc/self/cgroup`),
//! and the v1 hierarchies to name when there is no v2. Nothing here
//! writes, so it is safe on a host whose cgroups belong to someone else.

use std::path::{Path, PathBuf};

/// `statfs` f_type of a cgroup v2 filesystem.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Mount points of the `cgroup2` filesystems in a mountinfo text.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mounts(mountinfo)
        .filter(|(fs, _, _)| *fs == "cgroup2")
        .map(|(_, at, _)| at)
        .collect()
}

/// Controllers of the cgroup v1 hierarchies mounted (e.g. `memory`,
/// `cpu,cpuacct`), to say what the host uses instead.
pub fn v1_hierarchies(mountinfo: &str) -> Vec<String> {
    mounts(mountinfo)
        .filter(|(fs, _, _)| *fs == "cgroup")
        .map(|(_, at, opts)| {
            let named: Vec<&str> = opts
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro" | "xattr" | "noprefix" | "clone_children"))
                .collect();
            if named.is_empty() {
                at.display().to_string()
            } else {
                named.join(",")
            }
        })
        .collect()
}

/// (fstype, mount point, super options) of each mountinfo line.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (&str, PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let at = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let fs = r.next()?;
        let _source = r.next()?;
        let opts = r.next().unwrap_or("");
        Some((fs, PathBuf::from(unescape(at)), opts))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The unified-hierarchy path of a `/proc/PID/cgroup` text (`0::/a/b`).
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// `mount` joined with a `/proc/PID/cgroup` path (`/` is the mount itself).
pub fn join(mount: &Path, cgroup: &str) -> PathBuf {
    let rel = cgroup.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// The filesystem type of `path` (`statfs` f_type).
pub fn fs_type(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statfs(path)?;
    #[allow(clippy::unnecessary_cast)]
    Ok(s.f_type as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_HOST: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n";
    const V2_HOST: &str =
        "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn detect_v1_only_host_has_no_cgroup2_mount_and_names_its_hierarchies() {
        assert!(cgroup2_mounts(V1_HOST).is_empty());
        assert_eq!(v1_hierarchies(V1_HOST), ["cpu", "memory", "name=systemd"]);
        assert_eq!(cgroup2_mounts(V2_HOST), [PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn detect_unified_path_and_escaped_mount_points() {
        assert_eq!(
            unified_path("4:memory:/x\n0::/system.slice/tap-broker.service\n"),
            Some("/system.slice/tap-broker.service")
        );
        assert_eq!(unified_path("4:memory:/x\n"), None);
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        let t = "1 2 0:3 / /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mounts(t), [PathBuf::from("/mnt/cg two")]);
    }
}
