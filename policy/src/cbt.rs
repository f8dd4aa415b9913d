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
