//! The tapdisk worker: one confined process per disk.
//!
//! `image` is the format engine (raw and VHD chains, the `tapjail-image`
//! crate), `io` the io_uring file backing it runs on, `frontend` the ways a
//! kernel or a client reaches it (NBD, FUSE, ublk), `sandbox` the confinement applied before the first
//! byte of image data is parsed, `control` the broker-mode request loop and
//! `standalone` the privilege-separated `tapdisk --nbd` mode.

pub mod cbt;
pub mod coalesce;
pub mod control;
pub mod disk;
pub mod frontend;
/// The format engine, a crate of its own (`tapjail-image`) so that the
/// offline tools link it without the sandbox; re-exported under its old
/// path.
pub use tapjail_image as image;
pub mod io;
pub mod keyring;
pub mod latency;
pub mod mirror;
pub mod qos;
pub mod read_cache;
pub mod sandbox;
pub mod snapshot;
pub mod standalone;
pub mod stats;
