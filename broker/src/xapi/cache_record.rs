//! A minor's cache plan and read cache pairing on its record
//! (`MinorRecord::cache`), so that a restarted broker that adopts SM's
//! IntelliCache layout keeps it serving: the read cache minor A respawns
//! as a read cache again (its `-r` plan), and the clone B's read claim on
//! A's cache file coexists with A's writer claim again
//! ([`super::cached_parent`]) instead of being refused by it. Records
//! written before this field read as "no plan, no pairing".

use super::cached_parent;
use crate::table::{FileId, Table};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tapjail_common::xapi::CachePlan;
use tapjail_common::Minor;

/// What reopening a minor's image the way its open did needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The plan its worker got before `Open` (`-D`, `-e`, `-r`).
    #[serde(default)]
    pub plan: CachePlan,
    /// An `-e` clone of a read cache: that minor and its cache file.
    #[serde(default)]
    pub reads_cache_of: Option<(Minor, FileId)>,
}

impl CacheRecord {
    /// `minor`'s record, from its remembered `plan` and the table's
    /// pairing; `None` when there is nothing to keep.
    pub fn of(plan: CachePlan, t: &Table, minor: Minor) -> Option<CacheRecord> {
        let rec = CacheRecord {
            plan,
            reads_cache_of: t.cache_readers.get(&minor).copied(),
        };
        (rec != CacheRecord::default()).then_some(rec)
    }
}

/// The read cache minors on record: minor → (tenant, cache file).
pub fn read_caches<'a>(
    recs: impl Iterator<Item = (Minor, &'a crate::records::MinorRecord)>,
) -> BTreeMap<Minor, (String, FileId)> {
    recs.filter(|(_, r)| r.cache.is_some_and(|c| c.plan.read_cache))
        .filter_map(|(m, r)| {
            let file = r.served.as_ref()?.files.first()?.0;
            Some((m, (r.owner.clone(), file)))
        })
        .collect()
}

/// Pair adopted clone `minor` with its read cache again, before its files
/// are claimed, if its record says it reads one: the cache file must be
/// one its image reads (read-only) and the very file `from`'s record serves as read
/// cache for the same tenant. `Err` says why not, for the refusal.
pub fn adopt_pairing(
    t: &mut Table,
    minor: Minor,
    rec: &crate::records::MinorRecord,
    caches: &BTreeMap<Minor, (String, FileId)>,
) -> Result<(), String> {
    let (Some((from, cache)), Some(served)) = (
        rec.cache.and_then(|c| c.reads_cache_of),
        rec.served.as_ref(),
    ) else {
        return Ok(());
    };
    if !served.files.contains(&(cache, false)) {
        return Err(format!(
            "its record pairs it with read cache minor {from} on cache file {cache:?}, but its \
             image does not read that file on record; the records disagree"
        ));
    }
    match caches.get(&from) {
        Some((owner, file)) if *file == cache && *owner == rec.owner => {
            cached_parent::pair(t, minor, from, cache);
            Ok(())
        }
        Some((owner, file)) => Err(format!(
            "its record reads cache file {cache:?} of read cache minor {from}, but minor {from} \
             now serves cache file {file:?} (tenant {owner:?}): the cache is no longer the \
             clone's parent; open the clone again over the current cache"
        )),
        None => Err(format!(
            "its record reads cache file {cache:?} of read cache minor {from}, but minor {from} \
             serves no read cache on record: the clone's read claim would meet another writer"
        )),
    }
}

/// `unpaired` lost their pairing (their read cache closed): keep their
/// records in step, so a successor does not pair them again.
pub fn forget_pairings(t: &mut Table, unpaired: &[Minor]) {
    for m in unpaired {
        if let Some(d) = t.disks.get_mut(m) {
            if let Some(c) = d.cache.as_mut() {
                c.reads_cache_of = None;
            }
            // A leased disk writes its record when it settles.
            if !d.is_leased() {
                d.persist();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{MinorRecord, ServedRecord};

    fn m(n: u64) -> Minor {
        Minor::new(n).unwrap()
    }

    fn rec(owner: &str, files: &[FileId], cache: CacheRecord) -> MinorRecord {
        MinorRecord {
            owner: owner.into(),
            served: Some(ServedRecord {
                kind: tapjail_common::proto::ImageKind::Vhd,
                path: "/x".into(),
                root: "/".into(),
                relative: "x".into(),
                grant_read_only: false,
                open_uid: 0,
                open_gid: 0,
                owners: vec![],
                shared: false,
                read_only: false,
                size: 0,
                chain: vec![],
                files: files.iter().map(|f| (*f, false)).collect(),
                device: Default::default(),
            }),
            cache: Some(cache),
            ..Default::default()
        }
    }

    const CACHE: FileId = (1, 7);
    const GOLD: FileId = (1, 8);
    const LEAF: FileId = (1, 9);

    fn cache_minor(owner: &str, file: FileId) -> MinorRecord {
        let plan = CachePlan {
            read_cache: true,
            ..CachePlan::default()
        };
        rec(
            owner,
            &[file, GOLD],
            CacheRecord {
                plan,
                reads_cache_of: None,
            },
        )
    }

    fn clone_of(from: Minor) -> MinorRecord {
        let plan = CachePlan {
            leaf_fill: true,
            parents_buffered: true,
            ..CachePlan::default()
        };
        rec(
            "alice",
            &[LEAF, CACHE, GOLD],
            CacheRecord {
                plan,
                reads_cache_of: Some((from, CACHE)),
            },
        )
    }

    #[test]
    fn an_old_record_reads_as_no_plan_and_a_new_one_round_trips() {
        let old: MinorRecord = serde_json::from_str(
            r#"{"minor":1,"owner":"a","worker":null,"image":null,"frontend":null,"link":null}"#,
        )
        .unwrap();
        assert_eq!(old.cache, None);
        let b = clone_of(m(2));
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<MinorRecord>(&s).unwrap(), b);
    }

    #[test]
    fn an_adopted_clone_pairs_again_in_either_order_and_only_with_its_cache() {
        let (a, b) = (m(0), m(1));
        let recs = [(a, cache_minor("alice", CACHE)), (b, clone_of(a))];
        let caches = read_caches(recs.iter().map(|(m, r)| (*m, r)));
        assert_eq!(caches.len(), 1, "only A is a read cache");
        // B first: its read claim meets no writer yet, A's comes after.
        let mut t = Table::default();
        adopt_pairing(&mut t, b, &recs[1].1, &caches).unwrap();
        t.claim_files(b, &[(LEAF, true), (CACHE, false), (GOLD, false)])
            .unwrap();
        t.claim_files(a, &[(CACHE, true), (GOLD, false)]).unwrap();
        assert_eq!(cached_parent::reader_of(&t, b, 1), Some((a, CACHE)));
        // A first.
        let mut t = Table::default();
        t.claim_files(a, &[(CACHE, true), (GOLD, false)]).unwrap();
        adopt_pairing(&mut t, b, &recs[1].1, &caches).unwrap();
        t.claim_files(b, &[(LEAF, true), (CACHE, false), (GOLD, false)])
            .unwrap();
        // Without the pairing on record (today's records), B is refused.
        let mut t = Table::default();
        t.claim_files(a, &[(CACHE, true), (GOLD, false)]).unwrap();
        assert!(t.claim_files(b, &[(CACHE, false)]).is_err());
    }

    #[test]
    fn a_clone_whose_cache_changed_or_is_gone_is_refused() {
        let (a, b) = (m(0), m(1));
        let other = [(a, cache_minor("alice", (1, 99)))];
        let why = adopt_pairing(
            &mut Table::default(),
            b,
            &clone_of(a),
            &read_caches(other.iter().map(|(m, r)| (*m, r))),
        )
        .unwrap_err();
        assert!(why.contains("now serves cache file"), "{why}");
        let bob = [(a, cache_minor("bob", CACHE))];
        assert!(adopt_pairing(
            &mut Table::default(),
            b,
            &clone_of(a),
            &read_caches(bob.iter().map(|(m, r)| (*m, r))),
        )
        .is_err());
        let why =
            adopt_pairing(&mut Table::default(), b, &clone_of(a), &BTreeMap::new()).unwrap_err();
        assert!(why.contains("serves no read cache"), "{why}");
        let mut t = Table::default();
        assert!(t.cache_readers.is_empty());
        let mut stray = clone_of(a);
        stray.served.as_mut().unwrap().files[1].0 = LEAF;
        let caches = read_caches([(a, &cache_minor("alice", CACHE))].into_iter());
        assert!(adopt_pairing(&mut t, b, &stray, &caches).is_err());
        assert!(t.cache_readers.is_empty(), "a refused clone is not paired");
    }
}
