//! How a kernel or a client reaches the disk: NBD, FUSE (+ loop) or ublk.
//!
//! Every frontend works on fds it was handed (a listening socket, a
//! `/dev/fuse` connection, a `/dev/ublkcN`) and serves a shared [`Disk`]
//! until told to stop.

pub mod ublk;

use crate::disk::Disk;
use std::sync::Arc;

pub mod nbd;

/// Makes a running [`Frontend::serve`] return, from another thread.
pub type Stopper = Box<dyn FnOnce() + Send>;

/// A running frontend.
pub trait Frontend: Send {
    /// `nbd`, `fuse` or `ublk`, for stats and list.
    fn kind(&self) -> &'static str;

    /// Serve `disk` until the kernel side goes away or the disk is closed.
    /// Returns once no request is in flight.
    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError>;

    /// Finish whatever must be done before the broker may use the kernel
    /// side (FUSE: answer INIT), on the control thread, before `serve`
    /// starts on its own thread. The worker reports `Serving` after this.
    fn start(&mut self, _disk: &Arc<Disk>) -> Result<(), FrontendError> {
        Ok(())
    }

    /// A way to make `serve` return early (worker `Close`/`Shutdown`).
    /// `None`: `serve` returns once the kernel side goes away.
    fn stopper(&self) -> Option<Stopper> {
        None
    }
}

/// Frontend failures, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("frontend unavailable: {0}")]
    Unavailable(String),
}

/// Stack size of frontend threads. Under `mlockall(MCL_FUTURE)` a thread's
/// whole stack is faulted in and locked when it is created, and all locked
/// memory must fit under RLIMIT_MEMLOCK, so the 2 MiB default would be far
/// too expensive.
pub const THREAD_STACK: usize = 128 * 1024;

/// Spawn a named frontend thread with [`THREAD_STACK`].
pub fn spawn_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    spawn_thread_sized(name, THREAD_STACK, f)
}

/// Spawn a named thread with a given stack size (for threads that only
/// shuffle bytes and can make do with less).
pub fn spawn_thread_sized<T: Send + 'static>(
    name: &str,
    stack: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(stack)
        .spawn(f)
}
