//! Back to the normal scheduling policy.
//!
//! tap-broker may start a worker at `SCHED_FIFO` (its `control_priority`:
//! the worker's exec and confinement then run ahead of the tenants' I/O).
//! Nothing that reads a tenant's image may run at that priority, so the
//! worker goes back to `SCHED_OTHER` before it takes any input; the
//! broker checks every thread and kills a worker that did not.

/// Run the calling thread (the only one so far) at `SCHED_OTHER`, nice
/// unchanged. `SCHED_RESET_ON_FORK` stays set: an unprivileged process
/// may not clear it, and on `SCHED_OTHER` it only resets a negative nice
/// value for children.
pub fn normal() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid
    // sched_param that outlives the call.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_started_at_fifo_is_back_at_other() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "CI runs as root");
            return;
        }
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: pid 0 is this thread; param outlives the call.
            assert_eq!(
                unsafe {
                    libc::sched_setscheduler(
                        0,
                        libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                        &param,
                    )
                },
                0
            );
            // Unprivileged, as the worker is by then.
            // SAFETY: setresuid on this thread only (raw syscall).
            assert_eq!(
                unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) },
                0
            );
            super::normal().expect("an unprivileged thread may go back to SCHED_OTHER");
            // SAFETY: pid 0 is this thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy & !libc::SCHED_RESET_ON_FORK, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
