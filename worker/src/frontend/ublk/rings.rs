//! The ublk queue rings, made before confinement.
//!
//! A confined worker cannot make rings, so [`prepare`] makes one per queue
//! the broker said the device will have (`tapdisk --ublk-queues N
//! --ublk-depth D`): disabled, restricted to `URING_CMD`, `READ`, `WRITE`
//! and `FSYNC` on registered files, with an empty file table. A queue
//! thread [`take`]s one, puts the char device and its eventfd into slots 0
//! and 1 with `FILES_UPDATE`, and enables it, which makes that thread the
//! ring's only submitter. Dropping a queue's ring is what hands its tags
//! back to the driver, so a ring serves one queue once; a worker serves one
//! device and a replacement worker makes its own.
//!
//! An unconfined process (tests) that prepared nothing gets a ring made on
//! demand, by the same function.

use super::queue::FIRST_IMAGE_SLOT;
use crate::frontend::FrontendError;
use crate::image::direct::{MAX_DIRECT_FILES, MAX_SEGMENTS};
use crate::io::ring::{restricted, IowqMax, RingSpec, Uring};
use io_uring::opcode;
use std::sync::Mutex;
use tapjail_common::ublk_abi::{UBLK_DEFAULT_NR_QUEUES, UBLK_DEFAULT_QUEUE_DEPTH};

/// Opcodes a queue ring may run: driver commands, image I/O, the
/// slow path's eventfd.
const OPCODES: [u8; 4] = [
    opcode::UringCmd16::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
];

/// Queues and depth to make rings for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRings {
    pub queues: u16,
    pub depth: u16,
}

impl Default for QueueRings {
    /// What the broker creates devices with.
    fn default() -> Self {
        QueueRings {
            queues: UBLK_DEFAULT_NR_QUEUES,
            depth: UBLK_DEFAULT_QUEUE_DEPTH,
        }
    }
}

struct Made {
    sealed: bool,
    depth: u16,
    idle: Vec<Uring>,
}

static MADE: Mutex<Made> = Mutex::new(Made {
    sealed: false,
    depth: 0,
    idle: Vec::new(),
});

fn lock() -> std::sync::MutexGuard<'static, Made> {
    MADE.lock().unwrap_or_else(|e| e.into_inner())
}

/// io-wq caps of a queue ring: its image READ/WRITEs that cannot complete
/// without blocking (buffered reads of uncached data, direct writes that
/// allocate) run on these, the rest are async in the kernel already.
pub const QUEUE_RING_IOWQ: IowqMax = IowqMax {
    bounded: 4,
    unbounded: 1,
};

/// The ring of a queue of `depth` tags. Each tag has at most one command or
/// MAX_SEGMENTS image SQEs queued; a full SQ is flushed by `push`. The CQ
/// holds everything that can be in flight at once, so completions never
/// overflow.
fn spec(depth: u16) -> RingSpec<'static> {
    RingSpec {
        what: "a ublk queue ring",
        sq_entries: (u32::from(depth) * 2).next_power_of_two(),
        cq_entries: Some((u32::from(depth) * (MAX_SEGMENTS as u32 + 1) + 1).next_power_of_two()),
        // Only the queue thread ever submits, and it collects completions
        // only when it waits: task work (the driver hands requests over
        // through it) then runs in batches at that point instead of
        // interrupting request handling (Linux 6.1+).
        single_issuer: true,
        file_slots: FIRST_IMAGE_SLOT + MAX_DIRECT_FILES as u32,
        opcodes: &OPCODES,
        iowq: QUEUE_RING_IOWQ,
    }
}

/// Make the rings for `plan` and seal: no queue ring is made after this.
pub fn prepare(plan: QueueRings) -> std::io::Result<()> {
    let mut m = lock();
    for _ in m.idle.len()..usize::from(plan.queues) {
        let r = restricted(&spec(plan.depth))?;
        m.idle.push(r);
    }
    m.depth = plan.depth;
    m.sealed = true;
    Ok(())
}

/// A disabled, restricted ring for a queue of `depth` tags.
pub fn take(depth: u16) -> Result<Uring, FrontendError> {
    let mut m = lock();
    if !m.sealed {
        drop(m);
        return restricted(&spec(depth)).map_err(|source| FrontendError::Io {
            step: "making a ublk queue ring",
            source,
        });
    }
    if depth > m.depth {
        return Err(FrontendError::Unavailable(format!(
            "the device has {depth} tags per queue but this worker made its rings for {} \
             before confinement (tapdisk --ublk-depth)",
            m.depth
        )));
    }
    m.idle.pop().ok_or_else(|| {
        FrontendError::Unavailable(
            "no ublk queue ring left: this worker made one per queue before confinement \
             (tapdisk --ublk-queues) and each serves once; the device has more queues, or \
             is being served a second time (start a new worker)"
                .into(),
        )
    })
}
