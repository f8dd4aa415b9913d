//! Step 8: switch to the worker's own uid and gid.
//!
//! Supplementary groups are dropped, then gid, then uid (in that order: once
//! the uid is not 0 the gid can no longer be changed). We keep the permitted
//! capabilities across the uid switch (`PR_SET_KEEPCAPS`) only so that the
//! next step can still empty the bounding set, which needs `CAP_SETPCAP`;
//! that step then clears every set and the keep-caps flag.
//!
//! glibc applies `setgroups`/`setresgid`/`setresuid` to every thread of the
//! process, so this is correct even if a thread exists already.

use std::io;

/// The uid/gid the worker runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// The uid/gid switch step that failed.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("refusing to run the worker as uid 0 or gid 0")]
    Root,
    #[error("{step}: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "after switching, ids are uid {ruid}/{euid}/{suid} gid {rgid}/{egid}/{sgid}, not {want:?}"
    )]
    Mismatch {
        ruid: u32,
        euid: u32,
        suid: u32,
        rgid: u32,
        egid: u32,
        sgid: u32,
        want: Ids,
    },
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), IdsError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(IdsError::Syscall {
            step,
            source: io::Error::last_os_error(),
        })
    }
}

/// Become `ids`, irrevocably.
pub fn switch_to(ids: Ids) -> Result<(), IdsError> {
    if ids.uid == 0 || ids.gid == 0 {
        return Err(IdsError::Root);
    }
    // SAFETY: each call takes integers (or a null list of length 0) only.
    unsafe {
        check("setgroups([])", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(ids.gid, ids.gid, ids.gid))?;
        check(
            "prctl(PR_SET_KEEPCAPS, 1)",
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
        )?;
        check("setresuid", libc::setresuid(ids.uid, ids.uid, ids.uid))?;
    }
    let (ruid, euid, suid) = current_uids();
    let (rgid, egid, sgid) = current_gids();
    if [ruid, euid, suid] != [ids.uid; 3] || [rgid, egid, sgid] != [ids.gid; 3] {
        return Err(IdsError::Mismatch {
            ruid,
            euid,
            suid,
            rgid,
            egid,
            sgid,
            want: ids,
        });
    }
    Ok(())
}

/// (real, effective, saved) uid.
pub fn current_uids() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// (real, effective, saved) gid.
pub fn current_gids() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    (r, e, s)
}
