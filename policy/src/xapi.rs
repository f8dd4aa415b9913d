//! The policy side of XAPI's tap-ctl flags (`tapjail_common::xapi`): which
//! of them a tenant may use, and the minor `allocate -d` names. The request
//! underneath is then decided like any other.

use crate::config::{Policy, Tenant};
use crate::decide::{decide, BrokerView, Decision, PeerCred};
use tapjail_common::mirror::MirrorTarget;
use tapjail_common::proto::Request;
use tapjail_common::xapi::{minor_of_device, Options};

pub(crate) fn decide_options(
    req: &Request,
    opts: &Options,
    peer: &PeerCred,
    policy: &Policy,
    view: &dyn BrokerView,
    t: &Tenant,
) -> Decision {
    let deny = |rule, reason: String| Decision::deny(Some(t), rule, reason);
    let inner = match (req, &opts.device) {
        (Request::WithOptions { .. }, _) => {
            return deny("options", "options given twice in one request".into())
        }
        (Request::Allocate { minor: None }, Some(dev)) => {
            match minor_of_device(dev, &policy.device_dir) {
                Ok(m) => Request::Allocate { minor: Some(m) },
                Err(e) => return deny("device-path", e.to_string()),
            }
        }
        (other, _) => other.clone(),
    };
    if opts.cbt_log.is_some() {
        if let Some(d) = crate::cbt::refused(t, "-C/-c LOG") {
            return d;
        }
    }
    if opts.no_o_direct && !t.page_cache {
        return deny(
            "page-cache",
            format!(
                "tenant {} may not open images without O_DIRECT (-D): its policy says page_cache = false",
                t.name
            ),
        );
    }
    if opts.encryption_key.is_some() && !t.encryption {
        return deny(
            "encryption",
            format!(
                "tenant {} may not open encrypted images (-E): its policy says encryption = false",
                t.name
            ),
        );
    }
    if let Some(m) = opts.existing_parent {
        if !t.share_parent {
            return deny(
                "share-parent",
                format!(
                    "tenant {} may not share a parent chain (-e): its policy says share_parent = false",
                    t.name
                ),
            );
        }
        // Never across tenants, admin or not: the clone would read the
        // other tenant's gold master.
        if let Some(owner) = view.minor_owner(m) {
            if owner != t.name {
                return deny(
                    "foreign-parent",
                    format!(
                        "minor {m} (-e) does not belong to tenant {}: a parent chain is shared only between one tenant's disks",
                        t.name
                    ),
                );
            }
        }
    }
    if let Some(m) = &opts.mirror {
        if let Err((rule, why)) = mirror_allowed(t, m, peer, policy) {
            return deny(rule, why);
        }
    }
    if opts.read_cache {
        if let Err((rule, why)) = crate::read_cache::allowed(t, &inner) {
            return deny(rule, why);
        }
    }
    decide(&inner, peer, policy, view)
}

/// `-2 URI [-s]`: the URI must parse and name a secondary the tenant's
/// `mirror` key grants, or a file she may open for writing.
fn mirror_allowed(
    t: &Tenant,
    m: &tapjail_common::mirror::MirrorRequest,
    peer: &PeerCred,
    policy: &Policy,
) -> Result<(), (&'static str, String)> {
    let target = MirrorTarget::parse(&m.uri).map_err(|e| ("mirror-uri", e.to_string()))?;
    if let MirrorTarget::File(_, path) = &target {
        let open_as = crate::decide::OpenAs::peer(peer, t);
        let d = crate::secondary::decide_secondary_file(policy, &t.name, &open_as, path);
        return if d.allow {
            Ok(())
        } else {
            Err((d.rule, d.reason))
        };
    }
    if t.mirror.grant(&target).is_none() {
        let what = if t.mirror.is_empty() {
            "its policy has no mirror key".to_string()
        } else {
            format!(
                "its policy's mirror key allows unix_dirs {:?} and hosts {:?}",
                t.mirror.unix_dirs,
                t.mirror
                    .hosts
                    .iter()
                    .map(|(ip, p)| format!("{ip}:{}", p.map_or("*".into(), |p| p.to_string())))
                    .collect::<Vec<_>>()
            )
        };
        return Err((
            "mirror-target",
            format!("tenant {} may not mirror to {target}: {what}", t.name),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{two_tenants, View, ALICE, BOB};
    use tapjail_common::Minor;

    fn policy(extra: &str) -> Policy {
        two_tenants(extra, "")
    }

    fn open(minor: u64, opts: Options, image: &str) -> Request {
        Request::WithOptions {
            req: Box::new(Request::Open {
                pid: None,
                minor: Minor::new(minor).unwrap(),
                image: image.parse().unwrap(),
                read_only: true,
            }),
            opts,
        }
    }

    #[test]
    fn existing_parent_of_another_tenant_is_denied_even_to_an_admin() {
        let p = policy("");
        let opts = |m| Options {
            existing_parent: Some(Minor::new(m).unwrap()),
            ..Options::default()
        };
        let d = decide(&open(3, opts(2), "vhd:/srv/alice/c.vhd"), &ALICE, &p, &View);
        assert!(!d.allow);
        assert_eq!(d.rule, "foreign-parent");
        let d = decide(&open(3, opts(1), "vhd:/srv/bob/c.vhd"), &BOB, &p, &View);
        assert_eq!((d.allow, d.rule), (false, "foreign-parent"));
        let d = decide(&open(3, opts(1), "vhd:/srv/alice/c.vhd"), &ALICE, &p, &View);
        assert!(d.allow, "{}", d.reason);
        assert!(d.image.is_some(), "the image is still granted as for open");
    }

    #[test]
    fn page_cache_and_sharing_follow_the_tenants_policy() {
        let p = policy("page_cache = false\nshare_parent = false");
        let d = decide(
            &open(
                3,
                Options {
                    no_o_direct: true,
                    ..Options::default()
                },
                "vhd:/srv/alice/c.vhd",
            ),
            &ALICE,
            &p,
            &View,
        );
        assert_eq!((d.allow, d.rule), (false, "page-cache"));
        let d = decide(
            &open(
                3,
                Options {
                    existing_parent: Some(Minor::new(1).unwrap()),
                    ..Options::default()
                },
                "vhd:/srv/alice/c.vhd",
            ),
            &ALICE,
            &p,
            &View,
        );
        assert_eq!((d.allow, d.rule), (false, "share-parent"));
    }

    #[test]
    fn mirror_targets_follow_the_tenants_mirror_key() {
        let p = policy("mirror = { unix_dirs = [\"/run/sm\"], hosts = [\"10.0.0.5:10809\"] }");
        let opts = |uri: &str| Options {
            mirror: Some(tapjail_common::mirror::MirrorRequest {
                uri: uri.into(),
                standby: false,
            }),
            ..Options::default()
        };
        let d =
            |uri: &str, who: &PeerCred, img: &str| decide(&open(3, opts(uri), img), who, &p, &View);
        assert!(d("nbd:/run/sm/x.sock", &ALICE, "vhd:/srv/alice/c.vhd").allow);
        assert!(d("nbd:10.0.0.5:10809", &ALICE, "vhd:/srv/alice/c.vhd").allow);
        let x = d("nbd:/tmp/x.sock", &ALICE, "vhd:/srv/alice/c.vhd");
        assert_eq!((x.allow, x.rule), (false, "mirror-target"));
        assert!(x.reason.contains("/run/sm"), "{}", x.reason);
        let x = d("nbd:10.0.0.6:10809", &ALICE, "vhd:/srv/alice/c.vhd");
        assert_eq!((x.allow, x.rule), (false, "mirror-target"));
        let x = d("nbd:fdname", &ALICE, "vhd:/srv/alice/c.vhd");
        assert_eq!((x.allow, x.rule), (false, "mirror-uri"));
        // bob, an admin, has no mirror key: admin grants no secondary.
        let x = d("nbd:/run/sm/x.sock", &BOB, "vhd:/srv/bob/c.vhd");
        assert_eq!((x.allow, x.rule), (false, "mirror-target"));
        assert!(x.reason.contains("no mirror key"), "{}", x.reason);
    }

    #[test]
    fn allocate_by_device_path_is_decided_as_allocate_of_that_minor() {
        let p = policy("minors = [10, 19]");
        let alloc = |dev: &str| Request::WithOptions {
            req: Box::new(Request::Allocate { minor: None }),
            opts: Options {
                device: Some(dev.into()),
                ..Options::default()
            },
        };
        let d = decide(&alloc("/dev/xen/blktap-2/tapdev12"), &ALICE, &p, &View);
        assert!(d.allow, "{}", d.reason);
        let d = decide(&alloc("/dev/tapjail/tapdev3"), &ALICE, &p, &View);
        assert!(!d.allow, "minor 3 is outside alice's range");
        let d = decide(&alloc("/dev/sda"), &ALICE, &p, &View);
        assert_eq!((d.allow, d.rule), (false, "device-path"));
    }
}
