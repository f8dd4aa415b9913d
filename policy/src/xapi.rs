//! The policy side of XAPI's tap-ctl flags (`tapjail_common::xapi`): which
//! of them a tenant may use, and the minor `allocate -d` names. The request
//! underneath is then decided like any other.

use crate::config::{Policy, Tenant};
use crate::decide::{decide, BrokerView, Decision, PeerCred};
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
    decide(&inner, peer, policy, view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::Minor;

    struct View;
    impl BrokerView for View {
        fn minor_owner(&self, minor: Minor) -> Option<&str> {
            match minor.get() {
                1 => Some("alice"),
                2 => Some("bob"),
                _ => None,
            }
        }
        fn worker_owner(&self, _: u32) -> Option<&str> {
            None
        }
        fn minors_of(&self, _: &str) -> usize {
            0
        }
        fn workers_of(&self, _: &str) -> usize {
            0
        }
    }

    fn policy(extra: &str) -> Policy {
        Policy::parse(&format!(
            "[[tenant]]\nname = \"alice\"\nuids = [1000]\nimage_roots = [\"/srv/alice\"]\nwritable = true\n{extra}\n\
             [[tenant]]\nname = \"bob\"\nuids = [1001]\nimage_roots = [\"/srv/bob\"]\nadmin = true\n"
        ))
        .unwrap()
    }

    const ALICE: PeerCred = PeerCred {
        pid: 1,
        uid: 1000,
        gid: 1000,
    };
    const BOB: PeerCred = PeerCred {
        pid: 2,
        uid: 1001,
        gid: 1001,
    };

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
