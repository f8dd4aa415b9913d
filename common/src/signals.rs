//! Signals taken synchronously: blocked in every thread (threads inherit
//! the mask) and taken by one thread with `sigwait`, so no handler ever
//! runs in the middle of other code. The one copy for the broker and the
//! standalone worker monitor.

use std::io;

/// A set of signals blocked in the calling thread (and in the threads it
/// starts afterwards), to be taken with [`Blocked::wait`].
#[derive(Clone, Copy)]
pub struct Blocked(libc::sigset_t);

impl std::fmt::Debug for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blocked(..)")
    }
}

/// Block `signals` in the calling thread. Call it before starting other
/// threads, or they keep the signals unblocked.
pub fn block(signals: &[libc::c_int]) -> io::Result<Blocked> {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set;
    // pthread_sigmask reads it and writes nothing back (null old set).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            if libc::sigaddset(&mut set, s) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Blocked(set))
    }
}

impl Blocked {
    /// Wait for one of the blocked signals and return its number.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut sig: libc::c_int = 0;
        // SAFETY: the set was initialised by `block`; sig is a valid
        // out-pointer.
        let rc = unsafe { libc::sigwait(&self.0, &mut sig) };
        if rc == 0 {
            Ok(sig)
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

/// Unblock every signal. Async-signal-safe: for a forked child before
/// `exec`, which would otherwise inherit the parent's blocked set.
pub fn unblock_all() -> io::Result<()> {
    // SAFETY: sigemptyset on a local set; sigprocmask reads it.
    let rc = unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_signal_is_taken_by_wait() {
        // In a thread of its own, so the test harness's threads keep
        // their masks.
        std::thread::spawn(|| {
            let b = block(&[libc::SIGUSR2]).unwrap();
            // SAFETY: raise(3) to this thread; the signal is blocked, so
            // it stays pending until sigwait takes it.
            assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
            assert_eq!(b.wait().unwrap(), libc::SIGUSR2);
        })
        .join()
        .unwrap();
    }
}
