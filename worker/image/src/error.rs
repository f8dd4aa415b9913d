//! Typed errors of the image engine.

use std::io;

/// Everything that can go wrong opening or serving an image. A corrupt or
/// hostile image yields [`ImageError::Corrupt`] naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("I/O error {op} at byte {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("corrupt image: {field}: {reason}")]
    Corrupt { field: &'static str, reason: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("request out of range: offset {offset} length {len} on a {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("image is read-only")]
    ReadOnly,
    #[error("image is full: {0}")]
    NoSpace(String),
    #[error("parent image: {0}")]
    Parent(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A differencing chain longer than the engine accepts.
    #[error("parent chain deeper than {max} images (at {name})")]
    ChainTooDeep { name: String, max: usize },
    /// A parent that is already part of the chain (a loop).
    #[error("parent loop: {name} is already in the chain")]
    ParentLoop { name: String },
    /// The parent's UUID is not the one the child recorded.
    #[error("parent {name} has UUID {found}, but its child expects {expected}")]
    ParentUuidMismatch {
        name: String,
        expected: String,
        found: String,
    },
}

impl ImageError {
    /// Shorthand for a corrupt-field error.
    pub fn corrupt(field: &'static str, reason: impl Into<String>) -> Self {
        ImageError::Corrupt {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for an I/O error of operation `op` at `offset`.
    pub fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Self {
        move |source| ImageError::Io { op, offset, source }
    }

    /// Errno a block frontend should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ImageError::OutOfRange { .. } | ImageError::InvalidArgument(_) => libc::EINVAL,
            ImageError::ReadOnly => libc::EPERM,
            ImageError::NoSpace(_) => libc::ENOSPC,
            ImageError::Corrupt { .. }
            | ImageError::Unsupported(_)
            | ImageError::Parent(_)
            | ImageError::ChainTooDeep { .. }
            | ImageError::ParentLoop { .. }
            | ImageError::ParentUuidMismatch { .. } => libc::EIO,
        }
    }
}
