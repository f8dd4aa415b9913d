//! A tenant's `read_cache_root` key: where `open -r` read caches may live
//! (XAPI's IntelliCache; SM keeps them in the local SR's cache directory).
//!
//! ```toml
//! [[tenant]]
//! name = "sm"
//! image_roots = ["/srv/sm"]
//! read_cache_root = "/srv/sm/cache"
//! ```
//!
//! The root must lie beneath one of the tenant's own (not
//! `shared_readonly`) image roots: a cache file is opened like an image,
//! with her credentials, writable (fills are written into it). Without
//! the key a tenant may not use `-r`.

use super::Checker;
use crate::path::normalize_absolute;
use std::path::{Path, PathBuf};
use toml::Spanned;

pub(super) fn build(
    c: &mut Checker,
    tenant: &str,
    raw: Option<Spanned<String>>,
    image_roots: &[PathBuf],
    shared_roots: &[PathBuf],
) -> Option<PathBuf> {
    let raw = raw?;
    let span = raw.span();
    let p = match normalize_absolute(Path::new(raw.get_ref())) {
        Ok(p) => p,
        Err(e) => {
            c.at(
                span,
                format!("read_cache_root {}", super::path_problem(raw.get_ref(), &e)),
            );
            return None;
        }
    };
    let own = image_roots
        .iter()
        .filter(|r| !shared_roots.contains(r))
        .any(|r| p.starts_with(r));
    if !own {
        c.at(
            span,
            format!(
                "read_cache_root {} of tenant {tenant:?} is not beneath any of its own \
                 (not shared_readonly) image_roots: read caches are opened like images, \
                 writable, with the tenant's credentials",
                p.display()
            ),
        );
        return None;
    }
    Some(p)
}
