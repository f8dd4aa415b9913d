//! `-r` on a leaf: SM's IntelliCache leaf call
//! (`open -a vhd:LEAF -r -e A -2 vhd:VDI`, A the cache minor).
//!
//! blktap applies one mechanism for `-r` (its lcache, `block-lcache.c`):
//! data read from below the image is written back into it. tapjail keeps
//! two, told apart by the rule SM's calls follow: **`-r` with `-e A`, A a
//! read cache minor, is leaf mode; `-r` otherwise is a read cache minor.**
//!
//! Why two: the cache minor's file (`GOLD.vhdcache`) is shared. Its
//! clones read it as their parent while A fills it, so a sector may be
//! marked present only once its data is durable (`tapjail_image::vhd::
//! read_cache`), and the guest never writes it (served read-only). The
//! leaf is private to one minor and written by its guest, so its fills
//! must instead never overwrite a guest write (stripe locks shared with
//! the writes, `tapjail_worker::mirror::fill`) and must never reach the
//! secondary (blktap's `skip_mirror`). One type serving both would carry
//! both sets of rules everywhere; the rule above sends each case to the
//! mechanism whose guarantees it needs.
//!
//! Leaf mode is built where SM uses it: with a file secondary in mirror
//! mode (`-2 vhd:PATH`). `-r -e A` without `-2` serves the leaf writable
//! with no fills (SM never sends it; the audit says so).

use tapjail_common::xapi::Options;

/// The audited outcome's words for leaf mode.
pub const OUTCOME: &str = "; -r on a clone of a read cache (blktap's leaf-mode lcache): served \
     writable; with a -2 file secondary, reads from below fill the leaf (never the secondary), \
     without one no fills";

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
