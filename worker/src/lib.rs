//! The tapdisk worker: one confined process per disk.
//!
//! `image` is the format engine (raw and VHD chains), `frontend` the ways a
//! kernel or a client reaches it (NBD, FUSE, ublk), `sandbox` the confinement
//! applied before the first byte of image data is parsed.

pub mod disk;
pub mod frontend;
pub mod image;
