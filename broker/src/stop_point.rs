//! Named points where a crash test stops the broker: with
//! `TAPJAIL_TEST_STOP_AT=NAME` in its environment the broker sends itself
//! SIGSTOP on reaching `NAME`, so an e2e test can wait for the stopped
//! state in `/proc` and SIGKILL it exactly there (explicit
//! synchronisation, no sleeps). Unset, each point is one cached check.

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
    let me = rustix::process::getpid();
    if let Err(e) = rustix::process::kill_process(me, rustix::process::Signal::STOP) {
        tracing::warn!(point, error = %e, "{ENV}: SIGSTOP failed");
    }
}
