//! tap-ctl's raw system calls, each wrapped once with its SAFETY comment:
//! everything else in the crate calls these.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)`: `rel` must stay beneath `dir` and cross no
/// symbolic link (EXDEV / ELOOP otherwise).
pub fn openat2_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    openat2(dir.as_raw_fd(), rel, flags, resolve)
}

/// `openat2(dir, path, flags | O_CLOEXEC | O_NOCTTY, resolve)` (no
/// O_NOCTTY with O_PATH); `dir` may be `AT_FDCWD`.
pub fn openat2(dir: RawFd, path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: open_how is plain data; all-zero is its valid empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // openat2 refuses O_NOCTTY (and any flag but a few) with O_PATH.
    let noctty = if flags & libc::O_PATH == 0 {
        libc::O_NOCTTY
    } else {
        0
    };
    how.flags = (flags | libc::O_CLOEXEC | noctty) as u64;
    how.resolve = resolve;
    // SAFETY: `c` and `how` outlive the call and the size is how's own;
    // the kernel only reads them. A bad `dir` is an error, not UB.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: openat2 returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Clear `O_NONBLOCK` on an open file (opened non-blocking so that a FIFO
/// could not hang the open).
pub fn clear_nonblock(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a borrowed, open fd; integer arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl(F_SETFL) on a borrowed, open fd; integer arguments only.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which side of a [`fork`] we are on.
#[derive(Debug)]
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// `fork()`. Call only while the process has one thread: the child gets
/// a copy of this thread alone, and any lock another thread held would
/// stay locked in it forever.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees a single-threaded process, so the child
    // inherits no lock held by a thread that does not exist in it.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// How a waited-for child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// `waitpid(pid, 0)`, retried on EINTR.
pub fn wait(pid: libc::pid_t) -> io::Result<Exit> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local int.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            return Ok(Exit::Code(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Exit::Signal(libc::WTERMSIG(status)));
        }
    }
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: required before an unprivileged
/// seccomp filter or landlock domain, and keeps exec from gaining any.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into()).map(drop)
}

/// `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog)` on the calling thread.
pub fn seccomp_filter(prog: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies
    // the program and never writes through the pointer.
    check(
        unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            )
        }
        .into(),
    )
    .map(drop)
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`:
/// the landlock ABI version the kernel speaks.
pub fn landlock_abi() -> io::Result<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;
    // SAFETY: a NULL attribute with size 0 is the documented version query.
    let v = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    })?;
    Ok(u32::try_from(v).unwrap_or(0))
}

/// `struct landlock_ruleset_attr` (ABI 6 layout; older kernels get a
/// shorter prefix of it through `size`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct RulesetAttr {
    pub handled_access_fs: u64,
    pub handled_access_net: u64,
    pub scoped: u64,
}

/// `landlock_create_ruleset(attr, size, 0)`, passing the first `size`
/// bytes of `attr` (what the running kernel's ABI knows).
pub fn landlock_create_ruleset(attr: &RulesetAttr, size: usize) -> io::Result<OwnedFd> {
    let size = size.min(std::mem::size_of::<RulesetAttr>());
    // SAFETY: attr is valid for `size` bytes (at most its own size) for the
    // call; the kernel only reads it.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr as *const RulesetAttr,
            size,
            0u32,
        )
    })?;
    // SAFETY: the syscall returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `landlock_restrict_self(ruleset, 0)` on the calling thread.
pub fn landlock_restrict_self(ruleset: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: integer arguments only; the fd is borrowed and open.
    check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) })
        .map(drop)
}

/// Close every fd from 3 up except `keep`: the confined parser starts
/// with stdio and its socket only, whatever its caller leaked to it.
pub fn close_stray_fds(keep: RawFd) -> io::Result<()> {
    let close = |first: RawFd, last: RawFd| -> io::Result<()> {
        if first > last {
            return Ok(());
        }
        // SAFETY: integer arguments only; closing fds nobody in this
        // single-threaded child uses (the caller keeps what it needs).
        check(unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                last as libc::c_uint,
                0u32,
            )
        })
        .map(drop)
    };
    close(3, keep - 1)?;
    close((keep + 1).max(3), RawFd::MAX)
}

/// `capset` to no capabilities at all (effective, permitted, inheritable)
/// for the calling thread: a root parser keeps none of root's powers.
pub fn drop_all_caps() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and the two data words (version 3 takes two) live
    // for the call; the kernel only reads them.
    check(unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) })
        .map(drop)
}
