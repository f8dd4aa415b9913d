//! The tapdisk worker: one confined process per disk.
//!
//! `image` is the format engine (raw and VHD chains), `io` the io_uring
//! file backing it runs on, `frontend` the ways a kernel or a client reaches
//! it (NBD, FUSE, ublk), `sandbox` the confinement applied before the first
//! byte of image data is parsed, `control` the broker-mode request loop and
//! `standalone` the privilege-separated `tapdisk --nbd` mode.

pub mod control;
pub mod disk;
pub mod frontend;
pub mod image;
pub mod io;
pub mod sandbox;
pub mod standalone;
pub mod stats;
