//! Budget for auditing denials.
//!
//! The control socket is world-connectable, and every decision is
//! appended to the audit log and fsync'd before the reply. Unlimited, a
//! loop of refused requests costs the broker one fsync'd line each, and
//! a full disk stops the broker for everyone (it fails closed when the
//! log cannot be written). Counting lines was not enough: a peer that
//! matched no tenant sent Open frames with a 65,500-byte path of `\x01`,
//! 393 KB of escaped JSON per line, 1.4 GB an hour from one uid.
//!
//! So, besides the cap on every logged string (`tapjail_common::audit`,
//! 4 KiB) and logging strangers' requests by kind only, denials go
//! through byte and line budgets per window ([`Budget`]): per uid, the
//! first lines that fit in its budget are written in full; the rest are
//! counted and written as one `denials_suppressed` line per uid per
//! window ("uid 1234: 5000 further denied request(s) of kinds
//! {no-tenant} suppressed in the last 10 s"), hash-chained like every
//! other line. Room for that line is reserved in the budgets, so one uid
//! adds at most [`BYTES_PER_UID`] per window, and all peers of a class
//! together at most [`BYTES_TOTAL`] however many uids a user namespace
//! presents (beyond [`MAX_TRACKED_UIDS`] they share one count). Every
//! denial is still accounted for: in full, or in a count.
//!
//! Two classes, each with its own budgets, so that strangers cannot use
//! up the tenants' budget: strangers (peers matching no tenant, and
//! refusals at the connection limit) and tenants. A tenant's denials are
//! budgeted too, but more generously in lines: they are accountable
//! users, and their attempts at other tenants' disks are what the log is
//! for. Allowed requests are never limited.
//!
//! Pure bookkeeping with an injected clock; the broker writes the lines.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tapjail_common::audit::{Entry, Event, Peer, Verdict};
use tapjail_policy::PeerCred;

/// Most bytes one uid's denials add to the log per window, its summary
/// line included.
pub const BYTES_PER_UID: u64 = 64 * 1024;

/// Most bytes all uids of one class add per window, summaries included.
pub const BYTES_TOTAL: u64 = 1024 * 1024;

/// Uids counted individually per class; beyond this, one shared count.
pub const MAX_TRACKED_UIDS: usize = 256;

/// Bytes kept back in a budget for each summary line it may need.
pub const SUMMARY_RESERVE: u64 = 1024;

/// Most rule names a summary lists (they come from the broker and the
/// policy, a small fixed set; the cap keeps the line within
/// [`SUMMARY_RESERVE`] whatever happens).
const MAX_KINDS: usize = 8;

/// Whose denial it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A peer matching no tenant, or a refusal at the connection limit.
    Stranger,
    /// A tenant's own denied request.
    Tenant,
}

/// The limits of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub window: Duration,
    /// Lines one uid may write in full per window.
    pub lines_per_uid: u32,
    pub bytes_per_uid: u64,
    /// Lines all uids together may write in full per window.
    pub lines_total: u32,
    pub bytes_total: u64,
    pub max_uids: usize,
}

impl Budget {
    /// Strangers: 10 lines per uid, 100 for all (plus each uid's first),
    /// within the byte budgets.
    pub fn strangers(window: Duration) -> Budget {
        Budget {
            window,
            lines_per_uid: 10,
            bytes_per_uid: BYTES_PER_UID,
            lines_total: 100,
            bytes_total: BYTES_TOTAL,
            max_uids: MAX_TRACKED_UIDS,
        }
    }

    /// Tenants: bytes decide (64 KiB is ~130 typical denials per window).
    pub fn tenants(window: Duration) -> Budget {
        Budget {
            window,
            lines_per_uid: 1000,
            bytes_per_uid: BYTES_PER_UID,
            lines_total: 10_000,
            bytes_total: BYTES_TOTAL,
            max_uids: MAX_TRACKED_UIDS,
        }
    }

    /// Bytes of full lines one uid may write (its summary's room kept).
    fn uid_room(&self) -> u64 {
        self.bytes_per_uid.saturating_sub(SUMMARY_RESERVE)
    }

    /// Bytes of full lines all uids may write (every summary's room kept).
    fn total_room(&self) -> u64 {
        let summaries = u64::try_from(self.max_uids + 1).unwrap_or(u64::MAX);
        self.bytes_total
            .saturating_sub(summaries.saturating_mul(SUMMARY_RESERVE))
    }
}

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
    pub class: Class,
    /// `None`: the shared count of uids beyond [`MAX_TRACKED_UIDS`].
    pub uid: Option<u32>,
    /// The last peer counted (for the line's `peer`).
    pub last_peer: PeerCred,
    pub suppressed: u64,
    /// Bytes the suppressed lines would have taken.
    pub suppressed_bytes: u64,
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

    /// The summary as an audit entry (`tenant`: the peer's tenant, if any).
    pub fn entry(&self, tenant: Option<String>) -> Entry {
        let p = &self.last_peer;
        Entry {
            event: Event::DenialsSuppressed,
            peer: Some(Peer {
                pid: p.pid,
                uid: p.uid,
                gid: p.gid,
            }),
            tenant,
            request: Some(serde_json::json!({
                "uid": self.uid,
                "suppressed": self.suppressed,
                "suppressed_bytes": self.suppressed_bytes,
                "kinds": self.kinds,
                "window_secs": self.span.as_secs(),
            })),
            decision: Verdict::Deny,
            rule: "rate-limit".into(),
            reason: self.describe(),
            outcome: None,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    start: Instant,
    written: u32,
    bytes: u64,
    suppressed: u64,
    suppressed_bytes: u64,
    kinds: BTreeSet<String>,
    last_peer: PeerCred,
}

impl Bucket {
    fn new(now: Instant, peer: PeerCred) -> Bucket {
        Bucket {
            start: now,
            written: 0,
            bytes: 0,
            suppressed: 0,
            suppressed_bytes: 0,
            kinds: BTreeSet::new(),
            last_peer: peer,
        }
    }

    fn summary(&self, class: Class, uid: Option<u32>, now: Instant) -> Option<Summary> {
        (self.suppressed > 0).then(|| Summary {
            class,
            uid,
            last_peer: self.last_peer,
            suppressed: self.suppressed,
            suppressed_bytes: self.suppressed_bytes,
            kinds: self.kinds.clone(),
            span: now.saturating_duration_since(self.start),
        })
    }
}

/// The budget of one class.
#[derive(Debug)]
pub struct DenialLimiter {
    class: Class,
    budget: Budget,
    per_uid: HashMap<u32, Bucket>,
    others: Option<Bucket>,
    /// The shared budget's window: its start, full lines and bytes written.
    total: Option<(Instant, u32, u64)>,
}

impl DenialLimiter {
    pub fn new(class: Class, budget: Budget) -> DenialLimiter {
        DenialLimiter {
            class,
            budget,
            per_uid: HashMap::new(),
            others: None,
            total: None,
        }
    }

    /// A denial of `peer` by rule `kind`, whose line takes `bytes`, at
    /// `now`. Call [`Self::due`] first so that an ended window is
    /// summarized before a new one opens.
    pub fn admit(&mut self, peer: PeerCred, kind: &str, bytes: usize, now: Instant) -> Admit {
        let b = self.budget;
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        let (start, total_lines, total_bytes) = self.total.get_or_insert((now, 0, 0));
        if now.saturating_duration_since(*start) >= b.window {
            *start = now;
            *total_lines = 0;
            *total_bytes = 0;
        }
        let tracked = self.per_uid.contains_key(&peer.uid) || self.per_uid.len() < b.max_uids;
        let bucket = if tracked {
            self.per_uid
                .entry(peer.uid)
                .or_insert_with(|| Bucket::new(now, peer))
        } else {
            self.others.get_or_insert_with(|| Bucket::new(now, peer))
        };
        bucket.last_peer = peer;
        // A tracked uid's first denial of a window is written in full even
        // when the class's line count is spent: who is knocking matters
        // most, and otherwise a few uids flooding first would leave every
        // later uid only a count. Bytes still bound it (and at most
        // `max_uids` such lines exist per window).
        let first_of_uid = tracked && bucket.written == 0 && bucket.suppressed == 0;
        let fits = bucket.written < b.lines_per_uid
            && bucket.bytes.saturating_add(bytes) <= b.uid_room()
            && (*total_lines < b.lines_total || first_of_uid)
            && total_bytes.saturating_add(bytes) <= b.total_room();
        if fits {
            bucket.written += 1;
            bucket.bytes += bytes;
            *total_lines += 1;
            *total_bytes += bytes;
            Admit::Full
        } else {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            bucket.suppressed_bytes = bucket.suppressed_bytes.saturating_add(bytes);
            if !bucket.kinds.contains(kind) && bucket.kinds.len() < MAX_KINDS {
                bucket.kinds.insert(
                    tapjail_common::audit::cap_str(kind)
                        .chars()
                        .take(64)
                        .collect(),
                );
            }
            Admit::Counted
        }
    }

    /// Summaries of the windows that have ended by `now` (or of every
    /// window, if `all`: at shutdown). Ended windows are forgotten, so a
    /// uid's next denial starts a fresh budget.
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<Summary> {
        let window = self.budget.window;
        let class = self.class;
        let over = |b: &Bucket| all || now.saturating_duration_since(b.start) >= window;
        let mut out = Vec::new();
        self.per_uid.retain(|uid, b| {
            if !over(b) {
                return true;
            }
            out.extend(b.summary(class, Some(*uid), now));
            false
        });
        if self.others.as_ref().is_some_and(over) {
            out.extend(self.others.take().and_then(|b| b.summary(class, None, now)));
        }
        out.sort_by_key(|s| s.uid.map_or(u64::MAX, u64::from));
        out
    }
}

/// Both classes' budgets, as the broker keeps them.
#[derive(Debug)]
pub struct Denials {
    strangers: DenialLimiter,
    tenants: DenialLimiter,
}

impl Denials {
    pub fn new(window: Duration) -> Denials {
        Denials {
            strangers: DenialLimiter::new(Class::Stranger, Budget::strangers(window)),
            tenants: DenialLimiter::new(Class::Tenant, Budget::tenants(window)),
        }
    }

    /// Which budget `entry` goes through, if any: denials only.
    pub fn class_of(entry: &Entry) -> Option<Class> {
        if entry.decision != Verdict::Deny {
            return None;
        }
        Some(if entry.tenant.is_none() || entry.rule == "max-clients" {
            Class::Stranger
        } else {
            Class::Tenant
        })
    }

    /// What of `entry` is written: a stranger's request and any
    /// protocol error's by kind only (nobody accountable chose that
    /// payload), everything else as it is (strings capped when written).
    pub fn shape(class: Class, entry: &Entry) -> Entry {
        let protocol = matches!(entry.rule.as_str(), "protocol" | "frame");
        if class == Class::Stranger || protocol {
            entry.clone().kind_only()
        } else {
            entry.clone()
        }
    }

    /// A denial by rule `kind` whose line takes `bytes` ([`Entry::line_len`]).
    pub fn admit(
        &mut self,
        class: Class,
        peer: PeerCred,
        kind: &str,
        bytes: usize,
        now: Instant,
    ) -> Admit {
        let l = match class {
            Class::Stranger => &mut self.strangers,
            Class::Tenant => &mut self.tenants,
        };
        l.admit(peer, kind, bytes, now)
    }

    pub fn due(&mut self, now: Instant, all: bool) -> Vec<Summary> {
        let mut out = self.strangers.due(now, all);
        out.extend(self.tenants.due(now, all));
        out
    }
}

#[cfg(test)]
mod tests;
