//! The image-file rings of this process, shared by every open image file.
//!
//! A confined worker cannot make rings (seccomp refuses `io_uring_setup`),
//! so [`prepare`] makes them all before confinement, sized for the threads
//! that will do image I/O, and seals the pool. Each ring has the same
//! sparse table of [`FILE_SLOTS`] files; an open file claims one slot
//! number ([`Slot`]) and is put into that slot of a ring the first time it
//! uses that ring (one `FILES_UPDATE`), so every ring serves every file and
//! a request takes whichever ring is idle. A closed file's slot is cleared
//! in every ring, so no ring keeps a closed image open. Rings outlive
//! images: pause/unpause and reopening reuse them.
//!
//! A process that never prepared the pool (tests, tools) makes rings on
//! demand instead.

use super::ring::Ring;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Files open at once: two full chains (old and new image during an
/// unpause) of a leaf and its parents, with room to spare.
pub const FILE_SLOTS: u32 = 256;
/// Idle rings an unsealed (on-demand) pool keeps; more are closed.
const MAX_IDLE_UNSEALED: usize = 64;

/// A ring and which file (by id, 0 = none) each of its slots holds.
struct Pooled {
    ring: Ring,
    holds: Vec<u64>,
    /// `State::released` when `holds` was last checked for stale slots.
    seen_released: u64,
}

struct State {
    idle: Vec<Pooled>,
    total: usize,
    waiters: usize,
    /// Made before confinement: never make another ring.
    sealed: bool,
    /// The file id in each slot (0: free).
    slots: Vec<u64>,
    next_id: u64,
    /// Bumped whenever a file lets go of its slot.
    released: u64,
}

struct Pool {
    state: Mutex<State>,
    /// Signalled when a ring goes back to the pool.
    returned: Condvar,
}

static POOL: Pool = Pool {
    state: Mutex::new(State {
        idle: Vec::new(),
        total: 0,
        waiters: 0,
        sealed: false,
        slots: Vec::new(),
        next_id: 1,
        released: 0,
    }),
    returned: Condvar::new(),
};

fn lock() -> MutexGuard<'static, State> {
    POOL.state.lock().unwrap_or_else(|e| e.into_inner())
}

fn pooled(ring: Ring) -> Pooled {
    Pooled {
        ring,
        holds: vec![0; FILE_SLOTS as usize],
        seen_released: 0,
    }
}

/// Make rings until the pool has `rings`, then seal it: from now on no
/// ring is made, requests wait for an idle one. Run before seccomp.
pub fn prepare(rings: usize) -> io::Result<()> {
    let mut st = lock();
    while st.total < rings {
        let r = Ring::new(FILE_SLOTS)?;
        st.idle.push(pooled(r));
        st.total += 1;
    }
    st.sealed = true;
    Ok(())
}

/// Rings the pool has (idle or in use).
pub fn ring_count() -> usize {
    lock().total
}

/// Take an idle ring out of the pool for good, for the selftest's attacks
/// on what its restrictions forbid (`tapdisk --selftest-escape ring-*`).
pub fn take_for_selftest() -> Option<Ring> {
    let mut st = lock();
    let p = st.idle.pop()?;
    st.total -= 1;
    Some(p.ring)
}

/// One file's slot number in every ring, claimed for as long as the file
/// is open. Dropping it clears the slot in every ring.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    id: u64,
}

impl Slot {
    /// Claim a free slot. Fails when [`FILE_SLOTS`] files are open, or
    /// when no ring exists and none may be made.
    pub fn claim() -> io::Result<Slot> {
        let mut st = lock();
        if st.total == 0 {
            if st.sealed {
                return Err(no_rings());
            }
            let r = Ring::new(FILE_SLOTS)?;
            st.idle.push(pooled(r));
            st.total = 1;
        }
        if st.slots.is_empty() {
            st.slots = vec![0; FILE_SLOTS as usize];
        }
        let Some(index) = st.slots.iter().position(|&s| s == 0) else {
            return Err(io::Error::other(format!(
                "more than {FILE_SLOTS} image files open at once"
            )));
        };
        let id = st.next_id;
        st.next_id += 1;
        st.slots[index] = id;
        Ok(Slot {
            index: index as u32,
            id,
        })
    }

    /// The fixed-file index to use in SQEs on the ring `with_ring` gives.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Run `f` on an idle ring that has `fd` in this slot.
    pub fn with_ring<T>(
        &self,
        fd: RawFd,
        f: impl FnOnce(&mut Ring) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut p = take()?;
        let i = self.index as usize;
        if p.holds[i] != self.id {
            if let Err(e) = p.ring.set_slot(self.index, fd) {
                give_back(p);
                return Err(e);
            }
            p.holds[i] = self.id;
        }
        let out = f(&mut p.ring);
        give_back(p);
        out
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let i = self.index as usize;
        let mut st = lock();
        st.slots[i] = 0;
        st.released += 1;
        // Rings in use are cleaned when they come back (see `give_back`).
        for p in st.idle.iter_mut() {
            if p.holds[i] == self.id && p.ring.set_slot(self.index, -1).is_ok() {
                p.holds[i] = 0;
            }
        }
    }
}

fn no_rings() -> io::Error {
    io::Error::other(
        "no image-file io_uring ring: none was made before confinement, and a confined \
         worker cannot make one",
    )
}

/// An idle ring, a new one (unsealed pool), or the next one given back.
fn take() -> io::Result<Pooled> {
    let mut st = lock();
    loop {
        if let Some(p) = st.idle.pop() {
            return Ok(p);
        }
        if !st.sealed {
            match Ring::new(FILE_SLOTS) {
                Ok(r) => {
                    st.total += 1;
                    return Ok(pooled(r));
                }
                // Others hold rings and will give them back.
                Err(_) if st.total > 0 => {}
                Err(e) => return Err(e),
            }
        }
        if st.total == 0 {
            return Err(no_rings());
        }
        st.waiters += 1;
        st = POOL.returned.wait(st).unwrap_or_else(|e| e.into_inner());
        st.waiters -= 1;
    }
}

fn give_back(mut p: Pooled) {
    let mut st = lock();
    if p.seen_released != st.released {
        // Files closed while this ring was busy: let go of them.
        for (i, h) in p.holds.iter_mut().enumerate() {
            if *h != 0
                && st.slots.get(i).copied() != Some(*h)
                && p.ring.set_slot(i as u32, -1).is_ok()
            {
                *h = 0;
            }
        }
        p.seen_released = st.released;
    }
    if st.sealed || st.idle.len() < MAX_IDLE_UNSEALED {
        st.idle.push(p);
    } else {
        st.total -= 1;
    }
    let wake = st.waiters > 0;
    drop(st);
    if wake {
        POOL.returned.notify_one();
    }
}
