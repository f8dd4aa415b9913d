//! Step 6: every io_uring ring the worker will use, made and restricted
//! now, before seccomp takes `io_uring_setup` away (a ring's operations
//! bypass seccomp, so a ring made later would be an unrestricted one).
//!
//! How many, from what the worker knows at startup (its frontend, and for
//! ublk the queue geometry the broker passes as arguments):
//! - image-file rings ([`crate::io::pool`]): one per thread that may do
//!   image I/O at once — the frontend's I/O threads (NBD's pool, FUSE's
//!   serving threads, ublk's slow-path threads per queue) plus the control
//!   thread (open, flush, pause) and one spare. Fewer rings than callers
//!   means waiting for one, not failing;
//! - ublk: one queue ring per queue ([`crate::frontend::ublk::rings`]).
//!
//! Rings are small (two SQEs for a file ring) and outlive images, so
//! pause/unpause and reopening reuse them.

use crate::frontend::{fuse, nbd, ublk};
use tapjail_common::proto::FrontendKind;

/// Rings to make for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPlan {
    pub file_rings: usize,
    /// Queue rings (ublk only).
    pub ublk: Option<ublk::rings::QueueRings>,
}

/// The control thread and one spare.
const EXTRA_FILE_RINGS: usize = 2;

impl RingPlan {
    /// The rings a worker serving `frontend` needs; `queues` is the ublk
    /// geometry (ignored for the other frontends).
    pub fn for_frontend(frontend: FrontendKind, queues: ublk::rings::QueueRings) -> RingPlan {
        let (io_threads, ublk) = match frontend {
            FrontendKind::Nbd => (
                nbd::sizing::Sizing::UNLIMITED.io_threads + crate::qos::PACED_LANES,
                None,
            ),
            FrontendKind::Fuse => (fuse::DEFAULT_THREADS, None),
            FrontendKind::Ublk => (
                (ublk::SLOW_THREADS + ublk::PACED_THREADS) * usize::from(queues.queues),
                Some(queues),
            ),
        };
        RingPlan {
            file_rings: io_threads + EXTRA_FILE_RINGS,
            ublk,
        }
    }
}

/// Make every ring of `plan`.
pub fn prepare(plan: &RingPlan) -> std::io::Result<()> {
    crate::io::pool::prepare(plan.file_rings)?;
    if let Some(q) = plan.ublk {
        ublk::rings::prepare(q)?;
    }
    Ok(())
}
