//! Rate limit for auditing denials that anyone can cause.
//!
//! The control socket is world-connectable, and every decision is
//! appended to the audit log and fsync'd before the reply. A local user
//! who matches no tenant (or a uid that keeps hitting the connection
//! limit) therefore costs the broker one fsync'd line per `connect(2)`:
//! unlimited, such a loop slowed everyone's requests 40-fold and grew the
//! log by megabytes a minute, and a full disk stops the broker for
//! everyone (it fails closed when the log cannot be written).
//!
//! So these denials go through a budget: per uid, the first
//! [`DENIALS_IN_FULL`] in a window of [`DENIAL_WINDOW`] are written in
//! full; the rest are counted and written as one `denials_suppressed`
//! line per uid per window, hash-chained like every other line
//! ("uid 1234: 5000 further denied requests of kinds {no-tenant}
//! suppressed in the last 10 s"). All uids together get at most
//! [`FULL_LINES_PER_WINDOW`] full lines per window, and at most
//! [`MAX_TRACKED_UIDS`] uids are counted one by one (more, as a user
//! namespace with a subordinate uid range can present, share one
//! "other uids" count), so the log grows by a bounded number of lines per
//! window however many uids take part. Every denial is still accounted
//! for: in full, or in a count.
//!
//! Tenants' own denials are not limited here: a tenant is a configured,
//! accountable user, and its attempts at other tenants' disks are exactly
//! what the log is for. Only the connection limit (`max-clients`) is
//! limited for everyone, as it was before.
//!
//! Pure bookkeeping with an injected clock; the broker writes the lines.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tapjail_policy::PeerCred;

/// Length of one accounting window.
pub const DENIAL_WINDOW: Duration = Duration::from_secs(10);

/// Denials of one uid written in full per window.
pub const DENIALS_IN_FULL: u32 = 10;

/// Full lines of limited denials per window, all uids together.
pub const FULL_LINES_PER_WINDOW: u32 = 100;

/// Uids counted individually; beyond this, one shared count.
pub const MAX_TRACKED_UIDS: usize = 256;

/// Whether a denial is written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it in full.
    Full,
    /// Counted; it appears in the window's summary line.
    Counted,
}

/// One window's count of denials not written in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None`: the shared count of uids beyond [`MAX_TRACKED_UIDS`].
    pub uid: Option<u32>,
    /// The last peer counted (for the line's `peer`).
    pub last_peer: PeerCred,
    pub suppressed: u64,
    /// The rules that denied them (`no-tenant`, `frame`, ...).
    pub kinds: BTreeSet<String>,
    /// How long the window lasted when it was summarized.
    pub span: Duration,
}

impl Summary {
    /// The line's reason, in words.
    pub fn describe(&self) -> String {
        let who = match self.uid {
            Some(uid) => format!("uid {uid}"),
            None => format!(
                "uids beyond the {MAX_TRACKED_UIDS} counted one by one (last: uid {})",
                self.last_peer.uid
            ),
        };
        let kinds: Vec<&str> = self.kinds.iter().map(String::as_str).collect();
        format!(
            "{who}: {} further denied request(s) of kinds {{{}}} suppressed in the last {} s",
            self.suppressed,
            kinds.join(", "),
            self.span.as_secs().max(1)
        )
    }
}

#[derive(Debug)]
struct Bucket {
    start: Instant,
    written: u32,
    suppressed: u64,
    kinds: BTreeSet<String>,
    last_peer: PeerCred,
}

impl Bucket {
    fn new(now: Instant, peer: PeerCred) -> Bucket {
        Bucket {
            start: now,
            written: 0,
            suppressed: 0,
            kinds: BTreeSet::new(),
            last_peer: peer,
        }
    }

    fn summary(&self, uid: Option<u32>, now: Instant) -> Option<Summary> {
        (self.suppressed > 0).then(|| Summary {
            uid,
            last_peer: self.last_peer,
            suppressed: self.suppressed,
            kinds: self.kinds.clone(),
            span: now.saturating_duration_since(self.start),
        })
    }
}

/// The per-uid budget.
#[derive(Debug)]
pub struct DenialLimiter {
    window: Duration,
    in_full: u32,
    total_in_full: u32,
    max_uids: usize,
    per_uid: HashMap<u32, Bucket>,
    others: Option<Bucket>,
    /// The shared budget's window: its start and full lines written.
    total: Option<(Instant, u32)>,
}

impl Default for DenialLimiter {
    fn default() -> Self {
        DenialLimiter::new(
            DENIAL_WINDOW,
            DENIALS_IN_FULL,
            FULL_LINES_PER_WINDOW,
            MAX_TRACKED_UIDS,
        )
    }
}

impl DenialLimiter {
    pub fn new(
        window: Duration,
        in_full: u32,
        total_in_full: u32,
        max_uids: usize,
    ) -> DenialLimiter {
        DenialLimiter {
            window,
            in_full,
            total_in_full,
            max_uids,
            per_uid: HashMap::new(),
            others: None,
            total: None,
        }
    }

    /// A denial of `peer` by rule `kind` at `now`. Call [`Self::due`]
    /// first so that an ended window is summarized before a new one opens.
    pub fn admit(&mut self, peer: PeerCred, kind: &str, now: Instant) -> Admit {
        let window = self.window;
        let (start, total_written) = self.total.get_or_insert((now, 0));
        if now.saturating_duration_since(*start) >= window {
            *start = now;
            *total_written = 0;
        }
        let tracked = self.per_uid.contains_key(&peer.uid) || self.per_uid.len() < self.max_uids;
        let bucket = if tracked {
            self.per_uid
                .entry(peer.uid)
                .or_insert_with(|| Bucket::new(now, peer))
        } else {
            self.others.get_or_insert_with(|| Bucket::new(now, peer))
        };
        bucket.last_peer = peer;
        if bucket.written < self.in_full && *total_written < self.total_in_full {
            bucket.written += 1;
            *total_written += 1;
            Admit::Full
        } else {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            if !bucket.kinds.contains(kind) {
                bucket.kinds.insert(kind.to_string());
            }
            Admit::Counted
        }
    }

    /// Summaries of the windows that have ended by `now` (or of every
    /// window, if `all`: at shutdown). Ended windows are forgotten, so a
    /// uid's next denial starts a fresh budget.
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<Summary> {
        let window = self.window;
        let over = |b: &Bucket| all || now.saturating_duration_since(b.start) >= window;
        let mut out = Vec::new();
        self.per_uid.retain(|uid, b| {
            if !over(b) {
                return true;
            }
            out.extend(b.summary(Some(*uid), now));
            false
        });
        if self.others.as_ref().is_some_and(over) {
            out.extend(self.others.take().and_then(|b| b.summary(None, now)));
        }
        out.sort_by_key(|s| s.uid.map_or(u64::MAX, u64::from));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(uid: u32) -> PeerCred {
        PeerCred {
            pid: 1,
            uid,
            gid: uid,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn denials_first_n_in_full_then_one_summary_per_window() {
        let mut l = DenialLimiter::new(Duration::from_secs(10), 3, 100, 10);
        let t0 = Instant::now();
        let admits: Vec<Admit> = (0..1000)
            .map(|i| {
                let kind = if i % 2 == 0 { "no-tenant" } else { "frame" };
                l.admit(p(7), kind, t0 + MS * i)
            })
            .collect();
        assert_eq!(admits.iter().filter(|a| **a == Admit::Full).count(), 3);
        assert!(admits[..3].iter().all(|a| *a == Admit::Full));
        // Nothing is due while the window is open.
        assert!(l.due(t0 + Duration::from_secs(9), false).is_empty());
        let s = l.due(t0 + Duration::from_secs(10), false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].uid, Some(7));
        assert_eq!(s[0].suppressed, 997);
        assert_eq!(
            s[0].kinds.iter().map(String::as_str).collect::<Vec<_>>(),
            ["frame", "no-tenant"]
        );
        assert_eq!(
            s[0].describe(),
            "uid 7: 997 further denied request(s) of kinds {frame, no-tenant} suppressed in the last 10 s"
        );
        // Reported once; the next window starts with a full budget.
        assert!(l.due(t0 + Duration::from_secs(30), false).is_empty());
        assert_eq!(
            l.admit(p(7), "no-tenant", t0 + Duration::from_secs(31)),
            Admit::Full
        );
    }

    #[test]
    fn denials_of_one_uid_do_not_use_up_another_uids_budget() {
        let mut l = DenialLimiter::new(Duration::from_secs(10), 2, 100, 10);
        let t0 = Instant::now();
        for i in 0..50 {
            l.admit(p(7), "no-tenant", t0 + MS * i);
        }
        assert_eq!(l.admit(p(8), "no-tenant", t0 + MS * 60), Admit::Full);
        assert_eq!(l.admit(p(8), "no-tenant", t0 + MS * 61), Admit::Full);
        assert_eq!(l.admit(p(8), "no-tenant", t0 + MS * 62), Admit::Counted);
        let s = l.due(t0, true);
        assert_eq!(
            s.iter().map(|s| (s.uid, s.suppressed)).collect::<Vec<_>>(),
            [(Some(7), 48), (Some(8), 1)]
        );
    }

    #[test]
    fn denials_of_many_uids_stay_within_the_shared_budget() {
        // 10 000 uids (a user namespace's subordinate range), 5 each.
        let mut l = DenialLimiter::new(Duration::from_secs(10), 3, 50, 100);
        let t0 = Instant::now();
        let mut full = 0;
        for uid in 0..10_000u32 {
            for _ in 0..5 {
                if l.admit(p(uid), "no-tenant", t0 + MS) == Admit::Full {
                    full += 1;
                }
            }
        }
        assert_eq!(full, 50);
        let s = l.due(t0 + Duration::from_secs(11), false);
        // 100 tracked uids and one shared line, whatever the number of uids.
        assert_eq!(s.len(), 101);
        assert_eq!(s.last().unwrap().uid, None);
        let counted: u64 = s.iter().map(|s| s.suppressed).sum();
        assert_eq!(counted + full, 50_000, "every denial is accounted for");
        assert!(s.last().unwrap().describe().contains("last: uid 9999"));
    }

    #[test]
    fn denials_summary_of_a_quiet_window_is_empty() {
        let mut l = DenialLimiter::new(Duration::from_secs(10), 3, 100, 10);
        let t0 = Instant::now();
        l.admit(p(7), "no-tenant", t0);
        assert!(l.due(t0 + Duration::from_secs(11), false).is_empty());
        assert!(l.per_uid.is_empty());
    }
}
