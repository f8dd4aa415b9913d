//! What the running kernel's FUSE can do, from its release string.

/// FUSE_NOTIFY_RESEND arrived in Linux 6.9.
pub fn kernel_has_resend() -> bool {
    kernel_version().is_some_and(|v| v >= (6, 9))
}

pub(super) fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&release)
}

pub(super) fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}
