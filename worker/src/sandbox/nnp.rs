//! Step 10: `PR_SET_NO_NEW_PRIVS`.
//!
//! After this no execve can grant privileges (setuid bits, file
//! capabilities), and it is what lets an unprivileged process install
//! landlock and seccomp filters.

use std::io;

pub fn set() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    match unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } {
        1 => Ok(()),
        _ => Err(io::Error::other("PR_GET_NO_NEW_PRIVS does not report 1")),
    }
}
