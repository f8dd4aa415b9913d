//! Named points where a crash test stops the broker: with
//! `TAPJAIL_TEST_STOP_AT=NAME` in its environment the broker sends itself
//! SIGSTOP on reaching `NAME`, so an e2e test can wait for the stopped
//! state in `/proc` and SIGKILL it exactly there (explicit
//! synchronisation, no sleeps), or look at what it did so far and
//! SIGCONT it. Unset, each point is one cached check.

use std::sync::OnceLock;

/// The environment variable naming the point to stop at.
pub const ENV: &str = "TAPJAIL_TEST_STOP_AT";

/// Stop this process if the test asked for `point`.
pub fn reached(point: &'static str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(ENV).ok());
    if at.as_deref() != Some(point) {
        return;
    }
    tracing::warn!(point, "{ENV}: stopping the broker here (a crash test)");
    // To this thread, not the process: a process-directed SIGSTOP may be
    // taken by another thread, and until that one runs (late, under load)
    // this thread goes on past the point (it once sent the coalesce's
    // Switch first). Directed at us, the stop takes effect before the
    // call returns, and still stops every thread.
    // SAFETY: raise(3) only sends a signal to the calling thread; it
    // touches no memory of ours.
    if unsafe { libc::raise(libc::SIGSTOP) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(point, error = %e, "{ENV}: SIGSTOP failed");
    }
}
