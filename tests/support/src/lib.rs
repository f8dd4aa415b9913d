//! What the tapjail test suites share, so that each helper exists once:
//! preconditions that cannot pass by skipping under CI ([`require`]),
//! deterministic data and aligned buffers, kernel-state probes, the
//! turn-taking lock of the FUSE + loop tests, bounded child processes and
//! the fio verify writer.
//!
//! A dev-dependency of the other crates only; it depends on none of them,
//! so no crate's tests form a cycle through it.

mod data;
mod fio;
mod immutable;
mod kernel;
mod mount;
mod precondition;
mod process;
pub mod prometheus;
pub mod pty;

pub use data::{pattern, Aligned};
pub use fio::{fio_verify_writer, RandomVerifyWriter};
pub use immutable::Immutable;
pub use kernel::{
    dir_supports_o_direct, fd_flags, fuse_loop_turn, gettid, holds_open_direct, spawn_with_tid,
    tasks_in_d_state, ublk_char_devices, wait_blocked_in_kernel,
};
pub use mount::Tmpfs;
pub use precondition::{have, in_ci, is_root, require};
pub use process::output_within;
