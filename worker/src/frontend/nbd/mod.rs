//! The NBD frontend (fixed newstyle): a worker serves its disk to NBD
//! clients (qemu, nbdinfo, the kernel's nbd-client) on a listening socket
//! it was handed.
//!
//! - [`proto`]: the wire format, pure parsers and encoders (fuzzable);
//! - [`handshake`]: option haggling;
//! - [`conn`]: the transmission phase of one connection;
//! - [`pool`]: the shared I/O threads and in-flight budgets;
//! - [`sizing`]: how many threads, clients and bytes the memory limit allows;
//! - [`server`]: accepting clients, [`NbdFrontend`];
//! - [`kernel`]: the kernel's nbd client on sockets the broker connected,
//!   no negotiation, [`KernelNbdFrontend`].

pub mod conn;
pub mod handshake;
pub mod kernel;
pub mod pool;
pub mod proto;
pub mod server;
pub mod sizing;
pub mod sock;

pub use kernel::KernelNbdFrontend;
pub use server::NbdFrontend;
