//! Image I/O for the confined worker: an io_uring-driven [`Backing`]
//! ([`UringFile`]) over the fds the worker was handed, with per-ring
//! restrictions, and the aligned buffers the frontends use so that requests
//! reach `O_DIRECT` files without a copy.
//!
//! [`Backing`]: crate::image::Backing

pub mod buf;
pub mod file;
pub mod pool;
pub mod ring;

pub use buf::{AlignedBuf, BufPool};
pub use file::{CacheMode, UringFile};
