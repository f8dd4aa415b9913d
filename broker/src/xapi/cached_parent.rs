//! `open -e A` where A is a read cache (`open -r`), SM's IntelliCache
//! leaf step: the clone B is a child of A's cache file (SM's
//! `vhd-util snapshot LEAF.vhdcache PARENT.vhdcache`), so B's chain is
//! `[B's leaf, A's cache, gold...]`: B reads its own sectors from its
//! leaf, the sectors present in the cache from the cache, the rest from
//! the gold parents. B's worker opens the cache read-only, as a plain
//! parent; only A's worker writes it (fills), so there is one writer and
//! no protocol between workers. B's misses do not fill the cache (B
//! cannot write it); they are read from gold, which is what a cache miss
//! costs anyway, and A fills them when the guest on A, or a later open of
//! B, reads them through A. That keeps the design to one writer and no
//! new channel; a clone's own misses filling the cache is left out.
//!
//! Why B never reads wrong data from a cache A keeps writing:
//! - A marks a sector present only after its data is durable (a new
//!   block: data, sync, BAT entry; an allocated one: data, sync, bitmap
//!   bit; `tapjail_image::vhd::read_cache`). B's view of the metadata may
//!   be older than the file (read at open, or a stale bitmap), so it can
//!   only see fewer sectors present than there are: a miss, read from
//!   gold, whose bytes the cache copied. Never a present sector without
//!   its data.
//! - The cache is tied to its parent (UUID and time), checked by A at
//!   every open; B's worker opens the same gold through the cache's own
//!   locator and the broker checks (`-e`) that every file of B's chain is
//!   the very file A serves at that place, so B never reads a cache tied
//!   to another parent. Gold is held read-only (no writer) by both.
//! - A empties its cache only when its parent changed; while B is open
//!   the gold is locked against writers, so that does not happen unless
//!   the gold's time is changed by hand (`touch`): then a reopen of A
//!   empties and refills the cache under B. Documented as a limit.
//!
//! The broker side: B's open of the cache takes [`CACHE_READER`] locks
//! (reads, refuses nothing, so A's writer lock and B coexist), and the
//! table records the pair (`Table::cache_readers`) so the two claims on
//! the one file coexist, for B's respawns and A's too, until either closes.
//!
//! [`CACHE_READER`]: crate::image_open::locks::CACHE_READER

use crate::error::BrokerError;
use crate::table::{FileId, Table};
use tapjail_common::Minor;

/// The (read cache minor, cache file) `minor`'s parent #`depth` must be
/// opened as, if `minor` is an `-e` clone of a read cache and this is its
/// first parent.
pub fn reader_of(t: &Table, minor: Minor, depth: usize) -> Option<(Minor, FileId)> {
    (depth == 1)
        .then(|| t.cache_readers.get(&minor).copied())
        .flatten()
}

/// The file opened as `minor`'s cache parent is the cache it was paired
/// with (a respawn opens by locator again: the path may name another file
/// by now).
pub fn check(id: FileId, from: Minor, cache: FileId) -> Result<(), BrokerError> {
    if id == cache {
        return Ok(());
    }
    Err(BrokerError::denied(format!(
        "-e {from}: this image's parent is no longer the read cache file minor {from} serves; \
         the clone must be a child of that cache (vhd snapshot LEAF CACHE)"
    )))
}

/// Pair clone `minor` with read cache `from`'s file `cache` before its
/// open (see the module doc).
pub fn pair(t: &mut Table, minor: Minor, from: Minor, cache: FileId) {
    t.cache_readers.insert(minor, (from, cache));
}

/// Whether `a` and `b` are a read cache and its clone on file `id`.
pub fn paired(t: &Table, a: Minor, b: Minor, id: FileId) -> bool {
    t.cache_readers.get(&a) == Some(&(b, id)) || t.cache_readers.get(&b) == Some(&(a, id))
}

/// `minor` closed, or its `-e` open failed: its claims no longer coexist.
/// A closed read cache unpairs its clones too, so whatever opens the
/// file next for writing (even on a reused minor number) meets the
/// clones' read claims and is refused until they close.
pub fn unpair(t: &mut Table, minor: Minor) {
    t.cache_readers.remove(&minor);
    let clones: Vec<Minor> = t
        .cache_readers
        .iter()
        .filter(|(_, (from, _))| *from == minor)
        .map(|(m, _)| *m)
        .collect();
    t.cache_readers.retain(|_, (from, _)| *from != minor);
    super::cache_record::forget_pairings(t, &clones);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u64) -> Minor {
        Minor::new(n).unwrap()
    }

    #[test]
    fn only_a_paired_clone_shares_the_cache_file_with_its_writer() {
        let cache: FileId = (1, 7);
        let other: FileId = (1, 8);
        let mut t = Table::default();
        t.claim_files(m(0), &[(cache, true)]).unwrap();
        // Unpaired, a read claim on a file written elsewhere is refused.
        assert!(t.claim_files(m(1), &[(cache, false)]).is_err());
        pair(&mut t, m(1), m(0), cache);
        assert!(paired(&t, m(0), m(1), cache) && paired(&t, m(1), m(0), cache));
        t.claim_files(m(1), &[(cache, false)]).unwrap();
        // Only that file, only with that minor.
        t.claim_files(m(0), &[(other, true)]).unwrap();
        assert!(t.claim_files(m(1), &[(other, false)]).is_err());
        assert!(t.claim_files(m(2), &[(cache, false)]).is_err());
        // The cache's worker reclaims its file beside the clone (respawn).
        t.release_files(m(0), &[(cache, true)]);
        t.claim_files(m(0), &[(cache, true)]).unwrap();
        // A third minor may not write it either.
        t.release_files(m(0), &[(cache, true)]);
        assert!(t.claim_files(m(2), &[(cache, true)]).is_err());
        // The cache minor closes: its clone is unpaired, so a new writer
        // of the file (here on the same minor number) is refused.
        unpair(&mut t, m(0));
        assert!(!paired(&t, m(0), m(1), cache));
        assert!(t.claim_files(m(0), &[(cache, true)]).is_err());
        assert_eq!(reader_of(&t, m(1), 1), None);
        pair(&mut t, m(1), m(0), cache);
        assert_eq!(reader_of(&t, m(1), 1), Some((m(0), cache)));
        assert_eq!(reader_of(&t, m(1), 2), None, "only the leaf's own parent");
    }
}
