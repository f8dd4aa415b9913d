//! Step 8: not dumpable, after the uid switch.
//!
//! Other processes of the worker's uid must not ptrace it or read its
//! memory through /proc, and a crash must not dump core. The kernel resets
//! the dumpable flag to 1 whenever the credentials change (`setuid`), so
//! this runs after [`super::ids::switch_to`], never before. The broker
//! checks the result from outside: a non-dumpable process's `/proc/PID`
//! files belong to root.

use std::io;

pub fn off() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process is dumpable.
pub fn is_dumpable() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}
