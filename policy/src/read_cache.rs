//! `open -r` (XAPI's IntelliCache): a tenant may open a read cache only
//! beneath her `read_cache_root`, and only if she may write (fills are
//! written into the cache file). The open underneath is then decided as
//! any open, so the cache file must also lie in one of her image roots
//! (the config check guarantees the root does).

use crate::config::Tenant;
use crate::path::{normalize_absolute, under_root};
use tapjail_common::proto::Request;

/// Whether tenant `t` may open `req` with `-r`: `Err((rule, reason))` if not.
pub(crate) fn allowed(t: &Tenant, req: &Request) -> Result<(), (&'static str, String)> {
    let Some(root) = &t.read_cache_root else {
        return Err((
            "read-cache",
            format!(
                "tenant {} may not open a read cache (-r): its policy has no read_cache_root",
                t.name
            ),
        ));
    };
    let Request::Open { image, .. } = req else {
        return Err(("read-cache", "-r applies to open only".into()));
    };
    if !t.writable {
        return Err((
            "read-cache-writable",
            format!(
                "tenant {} may not open a read cache (-r): the cache file is written as reads \
                 fill it, and its policy says writable = false",
                t.name
            ),
        ));
    }
    let beneath = normalize_absolute(std::path::Path::new(&image.path))
        .ok()
        .is_some_and(|p| under_root(&p, std::slice::from_ref(root)).is_some());
    if !beneath {
        return Err((
            "read-cache-root",
            format!(
                "-r: {} is not beneath tenant {}'s read_cache_root {}: a read cache file lives \
                 there (SM keeps PARENT.vhdcache in the local SR's cache directory)",
                image.path,
                t.name,
                root.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Policy;
    use crate::decide::{decide, PeerCred};
    use crate::test_fixtures::{two_tenants, View, ALICE};
    use tapjail_common::proto::Request;
    use tapjail_common::xapi::Options;
    use tapjail_common::Minor;

    fn open_r(image: &str, read_only: bool) -> Request {
        Request::WithOptions {
            req: Box::new(Request::Open {
                pid: None,
                minor: Minor::new(3).unwrap(),
                image: image.parse().unwrap(),
                read_only,
            }),
            opts: Options {
                read_cache: true,
                ..Options::default()
            },
        }
    }

    fn d(p: &Policy, who: &PeerCred, image: &str) -> (bool, &'static str, String) {
        let d = decide(&open_r(image, false), who, p, &View);
        (d.allow, d.rule, d.reason)
    }

    #[test]
    fn read_cache_is_allowed_only_beneath_the_tenants_read_cache_root() {
        let p = two_tenants("read_cache_root = \"/srv/alice/cache\"", "");
        let (ok, _, why) = d(&p, &ALICE, "vhd:/srv/alice/cache/gold.vhdcache");
        assert!(ok, "{why}");
        let (ok, rule, why) = d(&p, &ALICE, "vhd:/srv/alice/gold.vhdcache");
        assert_eq!((ok, rule), (false, "read-cache-root"));
        assert!(why.contains("/srv/alice/cache"), "{why}");
        let (ok, rule, _) = d(&p, &ALICE, "vhd:/srv/alice/cache/../x.vhd");
        assert_eq!((ok, rule), (false, "read-cache-root"));
    }

    #[test]
    fn read_cache_without_the_key_or_write_permission_is_denied() {
        let p = two_tenants("", "");
        let (ok, rule, why) = d(&p, &ALICE, "vhd:/srv/alice/cache/g.vhdcache");
        assert_eq!((ok, rule), (false, "read-cache"));
        assert!(why.contains("read_cache_root"), "{why}");
        let p = Policy::parse(
            "[[tenant]]\nname = \"ro\"\nuids = [1000]\nimage_roots = [\"/srv/ro\"]\n\
             read_cache_root = \"/srv/ro/c\"\n",
        )
        .unwrap();
        let (ok, rule, _) = d(&p, &ALICE, "vhd:/srv/ro/c/g.vhdcache");
        assert_eq!((ok, rule), (false, "read-cache-writable"));
    }

    #[test]
    fn read_cache_root_outside_the_tenants_own_roots_is_a_config_error() {
        for (roots, root) in [
            ("[\"/srv/a\"]", "/srv/b/cache"),
            (
                "[{ path = \"/srv/gold\", shared_readonly = true }]",
                "/srv/gold/c",
            ),
            ("[\"/srv/a\"]", "cache"),
        ] {
            let text = format!(
                "[[tenant]]\nname = \"a\"\nuids = [7]\nimage_roots = {roots}\nwritable = true\n\
                 read_cache_root = \"{root}\"\n"
            );
            let e = Policy::parse(&text).unwrap_err().to_string();
            assert!(e.contains("read_cache_root"), "{root}: {e}");
        }
    }
}
