//! Changed-block tracking (`tap-ctl cbt`, `open -C`, `unpause -c`): a
//! tenant may track her own disks when her policy says `cbt = true` (the
//! default, as blktap), and each bitmap file must be one she could open
//! read-write herself, under her image roots.

use crate::config::{Policy, Tenant};
use crate::decide::{foreign_minor, grant, owned_or_admin, BrokerView, Decision, OpenAs};
use crate::path::normalize_absolute;
use std::path::Path;
use tapjail_common::cbt::{CbtOp, CbtRequest};

/// `cbt = false` refuses; `None` when the tenant may track.
pub(crate) fn refused(t: &Tenant, what: &str) -> Option<Decision> {
    (!t.cbt).then(|| {
        Decision::deny(
            Some(t),
            "cbt",
            format!(
                "tenant {} may not use changed-block tracking ({what}): its policy says cbt = false",
                t.name
            ),
        )
    })
}

pub(crate) fn decide_cbt(t: &Tenant, req: &CbtRequest, view: &dyn BrokerView) -> Decision {
    // Listing is reading: an admin may list any disk's bitmaps; changing
    // them is the owner's alone (it decides what her next backup holds).
    let list = req.op == CbtOp::List;
    if let Some(d) = foreign_minor(t, req.minor, view, list) {
        return d;
    }
    if !list {
        if let Some(d) = refused(t, &format!("cbt {}", req.op.as_str())) {
            return d;
        }
    }
    owned_or_admin(t, req.minor, view)
}

/// Whether `tenant`'s worker may track into the log file `path`, opened
/// read-write as `open_as` beneath one of her roots. The broker asks this
/// for every log it opens (at start, `-C`/`-c`, respawn, adoption).
pub fn decide_cbt_file(policy: &Policy, tenant: &str, open_as: &OpenAs, path: &Path) -> Decision {
    let Some(t) = policy.tenant(tenant) else {
        return Decision::deny(
            None,
            "no-tenant",
            format!("tenant {tenant:?} is no longer in the policy"),
        );
    };
    if let Some(d) = refused(t, "a CBT log") {
        return d;
    }
    let path = match normalize_absolute(path) {
        Ok(p) => p,
        Err(e) => {
            return Decision::deny(
                Some(t),
                "bad-path",
                format!("CBT log {}: {e}", path.display()),
            )
        }
    };
    match grant(t, open_as, &path, false) {
        Ok(g) => {
            let mut d = Decision::allow(
                t,
                "cbt-log",
                format!("CBT log {} is under {}", g.path.display(), g.root.display()),
            );
            d.image = Some(g);
            d
        }
        Err(d) => *d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::test_fixtures::{two_tenants, View, ALICE, BOB};
    use tapjail_common::proto::Request;
    use tapjail_common::Minor;

    fn policy(alice_extra: &str) -> Policy {
        two_tenants(alice_extra, "writable = true\n")
    }

    fn cbt(minor: u64, op: CbtOp) -> Request {
        Request::Cbt(CbtRequest {
            minor: Minor::new(minor).unwrap(),
            op,
            name: Some("b".into()),
        })
    }

    fn open_as(uid: u32) -> OpenAs {
        OpenAs {
            uid,
            gid: uid,
            owners: vec![uid],
        }
    }

    #[test]
    fn cbt_on_her_own_disk_follows_the_cbt_key() {
        let d = decide(&cbt(1, CbtOp::Start), &ALICE, &policy(""), &View);
        assert!(d.allow, "default is allowed: {}", d.reason);
        let off = policy("cbt = false");
        let d = decide(&cbt(1, CbtOp::Checkpoint), &ALICE, &off, &View);
        assert_eq!((d.allow, d.rule), (false, "cbt"));
        // Listing is reading: allowed even with cbt = false.
        assert!(decide(&cbt(1, CbtOp::List), &ALICE, &off, &View).allow);
    }

    #[test]
    fn an_admin_lists_but_never_changes_another_tenants_bitmaps() {
        let p = policy("");
        assert!(decide(&cbt(1, CbtOp::List), &BOB, &p, &View).allow);
        for op in [CbtOp::Start, CbtOp::Checkpoint, CbtOp::Stop] {
            let d = decide(&cbt(1, op), &BOB, &p, &View);
            assert_eq!((d.allow, d.rule), (false, "foreign-minor"), "{op:?}");
        }
        let d = decide(&cbt(2, CbtOp::List), &ALICE, &p, &View);
        assert_eq!((d.allow, d.rule), (false, "foreign-minor"));
    }

    #[test]
    fn a_log_must_be_under_her_roots_writable_and_cbt_allowed() {
        let p = policy("");
        let d = decide_cbt_file(
            &p,
            "alice",
            &open_as(1000),
            Path::new("/srv/alice/v.cbtlog"),
        );
        assert!(d.allow, "{}", d.reason);
        let g = d.image.unwrap();
        assert_eq!(g.relative, Path::new("v.cbtlog"));
        for bad in ["/srv/bob/v.cbtlog", "/etc/shadow", "/srv/alice/../bob/x"] {
            let d = decide_cbt_file(&p, "alice", &open_as(1000), Path::new(bad));
            assert!(!d.allow, "{bad}");
        }
        let off = policy("cbt = false");
        let d = decide_cbt_file(
            &off,
            "alice",
            &open_as(1000),
            Path::new("/srv/alice/v.cbtlog"),
        );
        assert_eq!((d.allow, d.rule), (false, "cbt"));
        let ro = Policy::parse(
            "[[tenant]]\nname = \"alice\"\nuids = [1000]\nimage_roots = [\"/srv/alice\"]\n",
        )
        .unwrap();
        let d = decide_cbt_file(
            &ro,
            "alice",
            &open_as(1000),
            Path::new("/srv/alice/v.cbtlog"),
        );
        assert_eq!((d.allow, d.rule), (false, "read-only-tenant"));
    }
}
