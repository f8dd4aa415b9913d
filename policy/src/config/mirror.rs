//! A tenant's `mirror` key: which secondaries `-2 URI` may name.
//!
//! ```toml
//! [[tenant]]
//! name = "sm"
//! mirror = { unix_dirs = ["/run/sm/nbd"], hosts = ["10.0.0.5:10809", "10.0.1.7:*"] }
//! ```
//!
//! A unix socket must sit directly in one of `unix_dirs` (the broker opens
//! it beneath that directory without following symlinks); a TCP target
//! must match one `IPV4:PORT` entry, `*` matching any port. Without the
//! key a tenant may not mirror at all.

use super::Checker;
use crate::path::normalize_absolute;
use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use tapjail_common::mirror::MirrorTarget;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMirror {
    #[serde(default)]
    unix_dirs: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}

/// The secondaries a tenant may mirror to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorGrants {
    pub unix_dirs: Vec<PathBuf>,
    /// `(ip, None)` matches any port.
    pub hosts: Vec<(Ipv4Addr, Option<u16>)>,
}

impl MirrorGrants {
    /// The directory that grants `target`, or `None` (for TCP: `Some` of
    /// an empty path when a host entry matches).
    pub fn grant(&self, target: &MirrorTarget) -> Option<PathBuf> {
        match target {
            MirrorTarget::Unix(p) => {
                let dir = p.parent()?;
                self.unix_dirs.iter().find(|d| d.as_path() == dir).cloned()
            }
            MirrorTarget::Tcp(ip, port) => self
                .hosts
                .iter()
                .any(|(i, p)| i == ip && p.is_none_or(|p| p == *port))
                .then(PathBuf::new),
            // A file secondary is decided as a writable image of the
            // tenant (`crate::secondary`), never by this key.
            MirrorTarget::File(..) => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.unix_dirs.is_empty() && self.hosts.is_empty()
    }
}

/// Check tenant `tenant`'s `mirror` table; bad entries are reported at
/// their line and left out.
pub(super) fn build(c: &mut Checker<'_>, tenant: &str, raw: Option<RawMirror>) -> MirrorGrants {
    let mut out = MirrorGrants::default();
    let Some(raw) = raw else {
        return out;
    };
    for d in raw.unix_dirs {
        match normalize_absolute(Path::new(d.get_ref())) {
            Ok(p) if p != Path::new("/") => out.unix_dirs.push(p),
            _ => c.at(
                d.span(),
                format!(
                    "mirror.unix_dirs of tenant {tenant:?}: {:?} must be an absolute directory other than / without '..'",
                    d.get_ref()
                ),
            ),
        }
    }
    for h in raw.hosts {
        match parse_host(h.get_ref()) {
            Some(e) => out.hosts.push(e),
            None => c.at(
                h.span(),
                format!(
                    "mirror.hosts of tenant {tenant:?}: {:?} must be IPV4:PORT or IPV4:*",
                    h.get_ref()
                ),
            ),
        }
    }
    out
}

fn parse_host(s: &str) -> Option<(Ipv4Addr, Option<u16>)> {
    let (ip, port) = s.rsplit_once(':')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    if port == "*" {
        return Some((ip, None));
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some((ip, Some(port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> MirrorGrants {
        MirrorGrants {
            unix_dirs: vec!["/run/sm/nbd".into()],
            hosts: vec![
                (Ipv4Addr::new(10, 0, 0, 5), Some(10809)),
                (Ipv4Addr::new(10, 0, 1, 7), None),
            ],
        }
    }

    #[test]
    fn only_named_dirs_and_hosts_are_granted() {
        let g = grants();
        let t = |u: &str| g.grant(&MirrorTarget::parse(u).unwrap());
        assert_eq!(t("nbd:/run/sm/nbd/a.sock"), Some("/run/sm/nbd".into()));
        assert_eq!(t("nbd:/run/sm/nbd/sub/a.sock"), None, "directly in the dir");
        assert_eq!(t("nbd:/run/sm/a.sock"), None);
        assert_eq!(t("nbd:/run/sm/nbdx/a.sock"), None);
        assert!(t("nbd:10.0.0.5:10809").is_some());
        assert_eq!(t("nbd:10.0.0.5:10810"), None);
        assert!(t("nbd:10.0.1.7:1").is_some());
        assert_eq!(t("nbd:10.0.1.8:10809"), None);
        assert_eq!(
            MirrorGrants::default().grant(&MirrorTarget::parse("nbd:/x/y").unwrap()),
            None
        );
    }

    #[test]
    fn host_entries_parse_strictly() {
        assert_eq!(
            parse_host("1.2.3.4:*"),
            Some((Ipv4Addr::new(1, 2, 3, 4), None))
        );
        for bad in [
            "1.2.3.4",
            "1.2.3.4:",
            "1.2.3.4:0",
            "host:80",
            "1.2.3.4:+1",
            "*:80",
        ] {
            assert_eq!(parse_host(bad), None, "{bad}");
        }
    }
}
