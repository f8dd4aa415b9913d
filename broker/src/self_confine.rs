//! What the broker's long-lived helper processes (the fd holder, the
//! image opener) do to themselves first: keep only the capabilities they
//! need, set no_new_privs, and stop being dumpable. One copy, so that the
//! two cannot drift apart.

use std::io;

/// Keep only the capabilities in the bit mask `keep` (effective and
/// permitted; numbers from `<linux/capability.h>`, all below 32), none
/// inheritable; no new privileges; not dumpable.
pub fn keep_only_capabilities(keep: u32) -> io::Result<()> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let low = CapData {
        effective: keep,
        permitted: keep,
        inheritable: 0,
    };
    let high = CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    let data = [low, high];
    // SAFETY: prctl with integer arguments; capset reads a header and two
    // data structs laid out as <linux/capability.h> says.
    unsafe {
        check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0).into())?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
        check(libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        ))?;
    }
    Ok(())
}
