//! Step 9: drop every capability.
//!
//! The bounding and ambient sets go first (emptying the bounding set needs
//! `CAP_SETPCAP`, which we still hold thanks to `PR_SET_KEEPCAPS` when we
//! came from root), then the securebits are locked so that no later execve
//! could ever grant capabilities again, then inheritable, effective and
//! permitted are cleared and checked. A worker started without capabilities
//! (standalone, as an ordinary user) has nothing to drop but the checks
//! still run.

use caps::{CapSet, Capability};

// Securebits (linux/securebits.h): never treat uid 0 as privileged, never
// fix up capabilities on uid changes, never keep capabilities, and lock
// all three so they cannot be changed back.
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("dropping capability set {set}: {reason}")]
    Drop { set: &'static str, reason: String },
    #[error("capability set {set} still holds {left} after dropping")]
    Left { set: &'static str, left: String },
    #[error("{step}: {source}")]
    Prctl {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub fn drop_all() -> Result<(), CapsError> {
    let had_setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .unwrap_or(false)
        || caps::has_cap(None, CapSet::Permitted, Capability::CAP_SETPCAP).unwrap_or(false);
    if had_setpcap {
        // Bounding set drops need CAP_SETPCAP in the effective set.
        let _ = caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP);
        caps::clear(None, CapSet::Bounding).map_err(|e| CapsError::Drop {
            set: "bounding",
            reason: e.to_string(),
        })?;
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED;
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) } != 0 {
            return Err(CapsError::Prctl {
                step: "prctl(PR_SET_SECUREBITS)",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| CapsError::Drop {
        set: "ambient",
        reason: e.to_string(),
    })?;
    for (set, name) in [
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        caps::clear(None, set).map_err(|e| CapsError::Drop {
            set: name,
            reason: e.to_string(),
        })?;
    }
    // SAFETY: prctl with integer arguments only. With KEEP_CAPS_LOCKED set
    // above this may fail with EPERM, which is fine: the flag is cleared on
    // the next execve anyway and there are no capabilities left to keep.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    for (set, name) in [
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Ambient, "ambient"),
    ] {
        let left = caps::read(None, set).map_err(|e| CapsError::Drop {
            set: name,
            reason: e.to_string(),
        })?;
        if !left.is_empty() {
            let mut names: Vec<String> = left.iter().map(|c| c.to_string()).collect();
            names.sort();
            return Err(CapsError::Left {
                set: name,
                left: names.join(","),
            });
        }
    }
    Ok(())
}
