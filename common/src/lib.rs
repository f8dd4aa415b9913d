//! What tap-ctl, the broker and the workers share: the wire protocol and its
//! framing, fd passing, minors, state bits and stats types.
//!
//! Nothing here decides policy or parses image bytes.

pub mod audit;
pub mod frame;
pub mod minor;
pub mod proto;
pub mod state;
pub mod stats;
pub mod ublk_abi;
pub mod worker_proto;

pub use minor::Minor;
