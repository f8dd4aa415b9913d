//! Images whose data is memory: a page of a tmpfs or ramfs file is charged
//! to the cgroup of the process that first writes it, and without swap it
//! cannot be reclaimed. A worker writing such an image has the data it
//! writes counted in its memory.max, so a disk larger than that fails once
//! written that far (measured in nestvm: memory.stat `shmem` grew by what
//! was written, 93 MiB in 3 s). tap-broker says so at open, from
//! `/proc/self/mountinfo` and the file's device number only: it never
//! stats the file itself (on FUSE that could wait on the server).

/// Filesystems whose file pages are unreclaimable memory.
const MEMORY_FILESYSTEMS: [&str; 2] = ["tmpfs", "ramfs"];

/// The memory filesystem (`tmpfs`, `ramfs`) mounted from device `dev`
/// (an `st_dev`), if that is what it is.
pub fn memory_fs(mountinfo: &str, dev: u64) -> Option<&'static str> {
    let want = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if left.split(' ').nth(2)? != want {
            return None;
        }
        let fs = right.split(' ').next()?;
        MEMORY_FILESYSTEMS.into_iter().find(|m| *m == fs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
30 22 0:27 / /tmp rw,nosuid shared:5 - tmpfs tmpfs rw,size=1024k\n\
31 22 0:28 / /mnt/r rw shared:6 - ramfs none rw\n\
32 22 0:45 / /mnt/fuse rw shared:7 - fuse.sshfs host: rw\n";

    #[test]
    fn memfs_tmpfs_and_ramfs_images_are_named_others_are_not() {
        let dev = |ma: u64, mi: u64| rustix::fs::makedev(ma as u32, mi as u32);
        assert_eq!(memory_fs(MOUNTINFO, dev(0, 27)), Some("tmpfs"));
        assert_eq!(memory_fs(MOUNTINFO, dev(0, 28)), Some("ramfs"));
        assert_eq!(memory_fs(MOUNTINFO, dev(253, 0)), None, "ext4");
        assert_eq!(memory_fs(MOUNTINFO, dev(0, 45)), None, "fuse");
        assert_eq!(memory_fs(MOUNTINFO, dev(0, 99)), None, "unknown device");
    }
}
