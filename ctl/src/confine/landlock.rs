//! A landlock domain that denies every filesystem access (and, where the
//! ABI has them, TCP bind/connect, abstract unix sockets and signals to
//! processes outside the domain): defence in depth under the seccomp
//! filter, which already refuses every path-opening call.

use crate::sys;
use std::io;
use std::os::fd::AsFd;

/// Every filesystem access right the kernel's ABI `abi` knows.
fn fs_rights(abi: u32) -> u64 {
    match abi {
        0 => 0,
        1 => (1 << 13) - 1,     // EXECUTE .. MAKE_SYM
        2 => (1 << 14) - 1,     // + REFER
        3 | 4 => (1 << 15) - 1, // + TRUNCATE
        _ => (1 << 16) - 1,     // + IOCTL_DEV
    }
}

/// Apply the domain. `Ok(None)` when the kernel has no landlock (ENOSYS,
/// or disabled at boot: EOPNOTSUPP); other failures are errors.
pub fn deny_all() -> io::Result<Option<u32>> {
    let abi = match sys::landlock_abi() {
        Ok(v) => v,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let attr = sys::RulesetAttr {
        handled_access_fs: fs_rights(abi),
        // ABI 4: BIND_TCP | CONNECT_TCP.
        handled_access_net: if abi >= 4 { 0b11 } else { 0 },
        // ABI 6: SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL.
        scoped: if abi >= 6 { 0b11 } else { 0 },
    };
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => 24,
    };
    // No rule is added: everything handled is denied.
    let ruleset = sys::landlock_create_ruleset(&attr, size)?;
    sys::landlock_restrict_self(ruleset.as_fd())?;
    Ok(Some(abi))
}
