//! `-2 vhd:PATH` / `-2 aio:PATH`: a *file* secondary (SM's IntelliCache
//! leaf call names the VM's VDI on the shared SR). Every guest write lands
//! in it, so it is decided as an image the tenant opens for writing: under
//! her image roots, writable tenant, not a shared read-only root, opened
//! with her own credentials. The `mirror` key's grants are for network
//! secondaries only; they never admit a file.

use crate::config::Policy;
use crate::decide::{grant, Decision, OpenAs};
use crate::path::normalize_absolute;
use std::path::Path;

/// Whether `tenant` may use the file `path` as a write secondary, opened
/// read-write as `open_as`. The broker asks at every open of it (open,
/// unpause, respawn), so a policy change is honoured on the next one.
pub fn decide_secondary_file(
    policy: &Policy,
    tenant: &str,
    open_as: &OpenAs,
    path: &Path,
) -> Decision {
    let Some(t) = policy.tenant(tenant) else {
        return Decision::deny(
            None,
            "no-tenant",
            format!("tenant {tenant:?} is no longer in the policy"),
        );
    };
    let path = match normalize_absolute(path) {
        Ok(p) => p,
        Err(e) => {
            return Decision::deny(
                Some(t),
                "bad-path",
                format!("secondary {}: {e}", path.display()),
            )
        }
    };
    match grant(t, open_as, &path, false) {
        Ok(g) => {
            let mut d = Decision::allow(
                t,
                "mirror-file",
                format!(
                    "secondary {} is under {}",
                    g.path.display(),
                    g.root.display()
                ),
            );
            d.image = Some(g);
            d
        }
        Err(mut d) => {
            d.reason = format!("-2 secondary: {}", d.reason);
            *d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{two_tenants, ALICE};

    fn alice() -> OpenAs {
        OpenAs {
            uid: ALICE.uid,
            gid: ALICE.gid,
            owners: vec![ALICE.uid],
        }
    }

    #[test]
    fn a_secondary_outside_the_tenants_roots_is_refused() {
        let p = two_tenants("", "");
        let ok = decide_secondary_file(&p, "alice", &alice(), Path::new("/srv/alice/vdi.vhd"));
        assert!(ok.allow, "{}", ok.reason);
        assert_eq!(
            ok.image.as_ref().unwrap().path,
            Path::new("/srv/alice/vdi.vhd")
        );
        for bad in ["/etc/shadow", "/srv/bob/vdi.vhd"] {
            let d = decide_secondary_file(&p, "alice", &alice(), Path::new(bad));
            assert!(!d.allow && d.rule == "outside-roots", "{bad}: {}", d.reason);
            assert!(d.reason.contains("secondary"), "{}", d.reason);
        }
        let d = decide_secondary_file(
            &p,
            "alice",
            &alice(),
            Path::new("/srv/alice/../bob/vdi.vhd"),
        );
        assert!(!d.allow && d.rule == "bad-path", "{}", d.reason);
        // bob may not write at all: a secondary is written.
        let bob = OpenAs {
            uid: 1001,
            gid: 1001,
            owners: vec![1001],
        };
        let d = decide_secondary_file(&p, "bob", &bob, Path::new("/srv/bob/vdi.vhd"));
        assert!(!d.allow && d.rule == "read-only-tenant", "{}", d.reason);
    }
}
