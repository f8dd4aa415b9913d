//! Choosing a new worker's uid in constant time.
//!
//! The broker's own workers are in its table (adopted ones included, from
//! the records that outlive a restart), so it skips their uids without
//! looking at the host. Whether some *other* process runs as the chosen
//! uid is checked by the worker itself, with one `clone` against the
//! kernel's per-uid task count (`tapdisk`'s `sandbox::sole_uid`); a worker
//! that finds its uid taken says so ([`UID_TAKEN`]) and the broker sets
//! that uid aside for a while and tries the next. Candidates are taken
//! round-robin, so a uid just freed is the last to be handed out again.

use crate::error::BrokerError;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
pub use tapjail_common::worker_proto::UID_TAKEN;

/// How long a uid found in use outside the broker's records is skipped.
pub const SET_ASIDE: Duration = Duration::from_secs(60);

/// Where the next search starts, and uids found taken by others.
#[derive(Debug, Default)]
pub struct UidPicker {
    next: Option<u32>,
    foreign: HashMap<u32, Instant>,
}

impl UidPicker {
    /// The next uid in `lo..=hi` after the last one handed out that is not
    /// in `ours` nor set aside; `None` when there is none.
    pub fn pick(&mut self, lo: u32, hi: u32, ours: &HashSet<u32>, now: Instant) -> Option<u32> {
        self.foreign
            .retain(|_, since| now.duration_since(*since) < SET_ASIDE);
        let start = self.next.filter(|n| (lo..=hi).contains(n)).unwrap_or(lo);
        let span = u64::from(hi - lo) + 1;
        // Bounded by what is excluded: at most ours + foreign + 1 steps.
        let limit = span.min(ours.len() as u64 + self.foreign.len() as u64 + 1);
        let mut u = start;
        for _ in 0..limit {
            if !ours.contains(&u) && !self.foreign.contains_key(&u) {
                self.next = Some(if u == hi { lo } else { u + 1 });
                return Some(u);
            }
            u = if u == hi { lo } else { u + 1 };
        }
        None
    }

    /// `uid` runs some process the broker did not start: skip it for
    /// [`SET_ASIDE`].
    pub fn set_aside(&mut self, uid: u32, now: Instant) {
        self.foreign.insert(uid, now);
    }
}

/// Whether a spawn failed because the worker found its uid is someone
/// else's (its `Error`, carried in the message).
pub fn is_uid_taken(e: &BrokerError) -> bool {
    e.message.contains(UID_TAKEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_round_robin_skipping_ours_and_set_aside_then_wraps() {
        let now = Instant::now();
        let mut p = UidPicker::default();
        let ours: HashSet<u32> = [11].into();
        assert_eq!(p.pick(10, 13, &ours, now), Some(10));
        assert_eq!(p.pick(10, 13, &ours, now), Some(12), "11 is ours");
        p.set_aside(13, now);
        assert_eq!(p.pick(10, 13, &ours, now), Some(10), "13 set aside: wraps");
        let all: HashSet<u32> = [10, 11, 12].into();
        assert_eq!(p.pick(10, 13, &all, now), None, "every uid ours or aside");
        assert_eq!(
            p.pick(10, 13, &all, now + SET_ASIDE),
            Some(13),
            "set aside only for a while"
        );
    }

    #[test]
    fn a_full_range_of_one_is_refused_not_looped() {
        let mut p = UidPicker::default();
        let ours: HashSet<u32> = [u32::MAX].into();
        assert_eq!(p.pick(u32::MAX, u32::MAX, &ours, Instant::now()), None);
        assert_eq!(
            p.pick(u32::MAX, u32::MAX, &HashSet::new(), Instant::now()),
            Some(u32::MAX)
        );
    }
}
