//! How a kernel or a client reaches the disk: NBD, FUSE (+ loop) or ublk.
//!
//! Every frontend works on fds it was handed (a listening socket, a
//! `/dev/fuse` connection, a `/dev/ublkcN`) and serves a shared [`Disk`]
//! until told to stop.

use crate::disk::Disk;
use std::sync::Arc;

/// A running frontend.
pub trait Frontend: Send {
    /// `nbd`, `fuse` or `ublk`, for stats and list.
    fn kind(&self) -> &'static str;

    /// Serve `disk` until the kernel side goes away or the disk is closed.
    /// Returns once no request is in flight.
    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError>;
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

pub mod fuse;
