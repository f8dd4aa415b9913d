//! The scheduler slice of the calling thread (EEVDF custom slices, Linux
//! 6.12 and later).
//!
//! Under EEVDF a waking task runs ahead of the current one when its
//! virtual deadline is earlier, and the deadline is the task's slice away
//! from when it became eligible: a shorter slice is a latency hint, not a
//! larger CPU share (that is what nice values change). The broker's
//! control plane does short bursts of work that wait on each other
//! (broker, image opener, a worker's exec and confinement), so it asks for
//! the shortest slice; a worker goes back to the default before it reads
//! image data. Threads and children inherit the slice.

use std::io;

/// The shortest slice the kernel takes (it clamps to 0.1-100 ms).
pub const SHORT_SLICE_NS: u64 = 100_000;

/// Set the calling thread's slice (`0`: back to the default), keeping its
/// policy (SCHED_OTHER) and nice value. Kernels before 6.12 ignore the
/// slice of a SCHED_OTHER task; the call still succeeds there.
pub fn set_slice(slice_ns: u64) -> io::Result<()> {
    // getpriority returns the nice value, and -1 is a valid one: errno
    // tells an error apart.
    // SAFETY: errno is this thread's; getpriority takes integers only.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice_ns,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr on this thread (pid 0) with a valid struct
    // whose size field is its size.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's slice in ns (`sched_attr.sched_runtime`).
pub fn slice() -> io::Result<u64> {
    // SAFETY: a plain C struct; all zeros is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: sched_getattr on this thread into a struct of `size` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.sched_runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own: the short slice is taken and inherited by
    /// a new thread, and 0 brings back the default.
    #[test]
    fn a_short_slice_is_set_inherited_and_reset() {
        std::thread::spawn(|| {
            let default = slice().unwrap();
            set_slice(SHORT_SLICE_NS).unwrap();
            assert_eq!(slice().unwrap(), SHORT_SLICE_NS);
            let child = std::thread::spawn(|| slice().unwrap()).join().unwrap();
            assert_eq!(child, SHORT_SLICE_NS);
            set_slice(0).unwrap();
            assert_eq!(slice().unwrap(), default);
        })
        .join()
        .unwrap();
    }
}
