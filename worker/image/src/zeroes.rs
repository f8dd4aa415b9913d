//! One read-only buffer of zeroes for every "write zeroes" path.
//!
//! The worker runs under `mlockall(MCL_CURRENT | MCL_FUTURE)` with a small
//! RLIMIT_MEMLOCK (8 MiB on hosts where the broker cannot raise it). There a
//! heap allocation beyond the limit fails, and Rust's global allocator
//! aborts the process on failure: a 1 MiB zero buffer allocated per discard
//! or per block allocation was enough to kill a worker whose serving
//! threads had taken the rest. A static lives in `.bss`, is locked once at
//! `mlockall` time and never allocates again.

/// Largest run of zeroes written by one `pwrite`.
pub const ZERO_CHUNK: usize = 128 << 10;

/// `ZERO_CHUNK` zero bytes.
pub static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
