//! The `[[tenant]]` tables: each tenant's ids, roots, limits and
//! grants, checked against the others (no uid, gid or minor claimed
//! twice, none inside the workers' range).

use super::raw::RawTenant;
use super::{
    defaults, io_limits, mirror, path_problem, read_cache, Checker, Tenant, MAX_CLIENTS_LIMIT,
    MAX_MINOR,
};
use crate::path::normalize_absolute;
use std::path::Path;
use toml::Spanned;

/// Every tenant of the file, in order; problems go to `c`.
pub(super) fn build_all(
    c: &mut Checker<'_>,
    raw_tenants: Vec<Spanned<RawTenant>>,
    worker_uids: (u32, u32),
) -> Vec<Tenant> {
    if raw_tenants.is_empty() {
        c.nowhere("no [[tenant]] defined: every client would be refused");
    }
    let mut tenants = Vec::new();
    // (value, tenant index) of every uid, gid, name seen, for duplicates.
    let mut seen_uid: Vec<(u32, String)> = Vec::new();
    let mut seen_gid: Vec<(u32, String)> = Vec::new();
    let mut minor_ranges: Vec<((u16, u16), String)> = Vec::new();
    for t in raw_tenants {
        let tspan = t.span();
        let t = t.into_inner();
        let name = t.name.get_ref().clone();
        if !valid_tenant_name(&name) {
            c.at(
                t.name.span(),
                format!("tenant name {name:?} must be 1-64 of a-z, 0-9, '-', '_'"),
            );
        }
        if tenants.iter().any(|o: &Tenant| o.name == name) {
            c.at(t.name.span(), format!("tenant {name:?} is defined twice"));
        }
        if t.uids.is_empty() && t.gids.is_empty() {
            c.at(
                tspan.clone(),
                format!("tenant {name:?} has neither uids nor gids: nobody could act as it"),
            );
        }
        let mut uids = Vec::new();
        for u in &t.uids {
            let Some(v) = id(c, "uid", u) else { continue };
            if (worker_uids.0..=worker_uids.1).contains(&v) {
                c.at(u.span(), format!("uid {v} of tenant {name:?} is inside worker_uids: a tenant must never share a worker's uid"));
            }
            if let Some((_, other)) = seen_uid.iter().find(|(x, _)| *x == v) {
                c.at(
                    u.span(),
                    format!("uid {v} is claimed by tenants {other:?} and {name:?}"),
                );
            }
            seen_uid.push((v, name.clone()));
            uids.push(v);
        }
        let mut gids = Vec::new();
        for g in &t.gids {
            let Some(v) = id(c, "gid", g) else { continue };
            if (worker_uids.0..=worker_uids.1).contains(&v) {
                c.at(
                    g.span(),
                    format!(
                        "gid {v} of tenant {name:?} is inside worker_uids (workers use equal gids)"
                    ),
                );
            }
            if let Some((_, other)) = seen_gid.iter().find(|(x, _)| *x == v) {
                c.at(
                    g.span(),
                    format!("gid {v} is claimed by tenants {other:?} and {name:?}"),
                );
            }
            seen_gid.push((v, name.clone()));
            gids.push(v);
        }
        let mut image_roots = Vec::new();
        let mut shared_roots = Vec::new();
        for r in &t.image_roots {
            let raw_root = r.get_ref();
            match normalize_absolute(Path::new(&raw_root.path)) {
                Ok(p) if p == Path::new("/") => c.at(
                    r.span(),
                    format!("image root \"/\" would expose the whole host to tenant {name:?}"),
                ),
                Ok(p) if image_roots.contains(&p) => c.at(
                    r.span(),
                    format!(
                        "image root {} is listed twice for tenant {name:?}",
                        p.display()
                    ),
                ),
                Ok(p) => {
                    if raw_root.shared_readonly {
                        shared_roots.push(p.clone());
                    }
                    image_roots.push(p)
                }
                Err(e) => c.at(
                    r.span(),
                    format!("image root {}", path_problem(&raw_root.path, &e)),
                ),
            }
        }
        // A shared root nested in (or containing) an ordinary root of the
        // same tenant would make the rules for one file depend on which
        // root matched first.
        for s in &shared_roots {
            if let Some(o) = image_roots
                .iter()
                .find(|o| *o != s && (o.starts_with(s) || s.starts_with(o)))
            {
                c.at(
                    tspan.clone(),
                    format!(
                        "shared_readonly image root {} of tenant {name:?} overlaps its image \
                         root {}: keep gold masters in a directory of their own",
                        s.display(),
                        o.display()
                    ),
                );
            }
        }
        let max_disks = t.max_disks.map_or(defaults::MAX_DISKS, |m| {
            c.int_in(
                "max_disks",
                &m,
                0,
                i64::from(tapjail_common::Minor::COUNT),
                0,
            )
        });
        let tenant_clients = t.max_clients.map_or(defaults::TENANT_MAX_CLIENTS, |m| {
            c.int_in(
                "max_clients",
                &m,
                1,
                i64::from(MAX_CLIENTS_LIMIT),
                defaults::TENANT_MAX_CLIENTS,
            )
        });
        let minors = t.minors.and_then(|m| {
            let span = m.span();
            match m.get_ref().as_slice() {
                [lo, hi] if *lo >= 0 && lo <= hi && *hi <= i64::from(MAX_MINOR) => {
                    let r = (u16::try_from(*lo).unwrap_or(0), u16::try_from(*hi).unwrap_or(0));
                    if let Some((_, other)) = minor_ranges
                        .iter()
                        .find(|((a, b), _)| r.0 <= *b && *a <= r.1)
                    {
                        c.at(span, format!("minors {}..={} of tenant {name:?} overlap those of tenant {other:?}", r.0, r.1));
                    }
                    minor_ranges.push((r, name.clone()));
                    Some(r)
                }
                _ => {
                    c.at(span, format!("minors must be a range [FIRST, LAST] within 0..={MAX_MINOR}"));
                    None
                }
            }
        });
        let disk_io = io_limits::build(c, &name, "disk_io", t.disk_io);
        let tenant_io = io_limits::build(c, &name, "tenant_io", t.tenant_io);
        let mirror = mirror::build(c, &name, t.mirror);
        let read_cache_root =
            read_cache::build(c, &name, t.read_cache_root, &image_roots, &shared_roots);
        tenants.push(Tenant {
            name,
            uids,
            gids,
            image_roots,
            shared_roots,
            writable: t.writable.unwrap_or(false),
            max_disks,
            minors,
            admin: t.admin.unwrap_or(false),
            max_clients: tenant_clients,
            cgroup: crate::cgroups::tenant(c, t.cpu_weight, t.io_weight),
            disk_io,
            tenant_io,
            page_cache: t.page_cache.unwrap_or(true),
            share_parent: t.share_parent.unwrap_or(true),
            mirror,
            encryption: t.encryption.unwrap_or(true),
            online_snapshot: t.online_snapshot.unwrap_or(true),
            cbt: t.cbt.unwrap_or(true),
            read_cache_root,
        });
    }
    tenants
}

fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn id(c: &mut Checker<'_>, what: &str, v: &Spanned<i64>) -> Option<u32> {
    match u32::try_from(*v.get_ref()) {
        Ok(x) if x != u32::MAX => Some(x),
        _ => {
            c.at(
                v.span(),
                format!("{what} {} is not a valid id", v.get_ref()),
            );
            None
        }
    }
}
