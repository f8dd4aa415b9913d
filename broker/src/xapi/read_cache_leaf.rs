//! `-r` on a leaf: SM's IntelliCache leaf call
//! (`open -a vhd:LEAF -r -e A [-2 vhd:VDI [-s]]`, A the cache minor).
//!
//! blktap applies one mechanism for `-r` (its lcache, `block-lcache.c`):
//! data read from below the image is written back into it. On SM's cache
//! minor the image is `GOLD.vhdcache`, which nobody else writes, so tapjail
//! serves that case as a read-only read cache minor (`crate::xapi`'s `-r`).
//! On the leaf the guest writes the image too, so the two are told apart
//! here by the rule SM's calls follow: **`-r` with `-e A`, where A is a read
//! cache minor, is leaf mode; `-r` alone is a read cache minor.** A leaf in
//! leaf mode is served writable, as a plain chain leaf → (secondary) → A's
//! cache → gold.
//!
//! Not built: leaf mode's copy-on-read (blktap fills the leaf with what it
//! read from below, never mirrored to the secondary): reads through the
//! leaf are served from below without filling it. The audit says so.

use tapjail_common::xapi::Options;

/// The audited outcome's words for leaf mode.
pub const OUTCOME: &str = "; -r on a clone of a read cache (blktap's leaf-mode lcache): served \
     writable; copy-on-read into the leaf is not built, reads go to the parents";

/// Whether `opts` ask for leaf mode: `-r` and `-e MINOR` with MINOR a read
/// cache minor (`is_read_cache`).
pub fn leaf_mode(opts: &Options, is_read_cache: impl Fn(tapjail_common::Minor) -> bool) -> bool {
    opts.read_cache && opts.existing_parent.is_some_and(is_read_cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::Minor;

    #[test]
    fn r_with_e_of_a_read_cache_is_leaf_mode_and_r_alone_is_not() {
        let a = Minor::new(3).unwrap();
        let cache = |m: Minor| m == a;
        let mut o = Options {
            read_cache: true,
            ..Options::default()
        };
        assert!(!leaf_mode(&o, cache), "-r alone: a read cache minor");
        o.existing_parent = Some(a);
        assert!(leaf_mode(&o, cache));
        o.existing_parent = Some(Minor::new(4).unwrap());
        assert!(!leaf_mode(&o, cache), "-e of a plain minor");
        o.read_cache = false;
        o.existing_parent = Some(a);
        assert!(!leaf_mode(&o, cache), "no -r");
    }
}
