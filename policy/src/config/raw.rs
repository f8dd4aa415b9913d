//! The file's shape as serde reads it: every field keeps its byte span
//! (`toml::Spanned`), so that a semantic error points at its line.

use super::{io_limits, mirror, FrontendChoice};
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) socket: Option<Spanned<String>>,
    pub(super) audit_log: Option<Spanned<String>>,
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) device_dir: Option<Spanned<String>>,
    pub(super) worker_uids: Option<Spanned<Vec<i64>>>,
    pub(super) tapdisk: Option<Spanned<String>>,
    pub(super) frontend: Option<Spanned<FrontendChoice>>,
    pub(super) nbd_kernel_connections: Option<Spanned<i64>>,
    pub(super) worker_memlock_mib: Option<Spanned<i64>>,
    pub(super) respawn: Option<bool>,
    pub(super) max_restarts_per_minute: Option<Spanned<i64>>,
    pub(super) worker_timeout_secs: Option<Spanned<i64>>,
    pub(super) operation_timeout_secs: Option<Spanned<i64>>,
    pub(super) client_frame_timeout_secs: Option<Spanned<i64>>,
    pub(super) max_clients: Option<Spanned<i64>>,
    pub(super) audit_window_secs: Option<Spanned<i64>>,
    pub(super) subuid_file: Option<Spanned<String>>,
    pub(super) subgid_file: Option<Spanned<String>>,
    pub(super) passwd_file: Option<Spanned<String>>,
    pub(super) group_file: Option<Spanned<String>>,
    pub(super) cgroups: Option<Spanned<crate::cgroups::CgroupMode>>,
    pub(super) cgroup_root: Option<Spanned<String>>,
    pub(super) worker_memory_max_mib: Option<Spanned<i64>>,
    pub(super) worker_pids_max: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) tenant: Vec<Spanned<RawTenant>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) uids: Vec<Spanned<i64>>,
    #[serde(default)]
    pub(super) gids: Vec<Spanned<i64>>,
    #[serde(default)]
    pub(super) image_roots: Vec<Spanned<RawRoot>>,
    pub(super) writable: Option<bool>,
    pub(super) max_disks: Option<Spanned<i64>>,
    pub(super) minors: Option<Spanned<Vec<i64>>>,
    pub(super) admin: Option<bool>,
    pub(super) max_clients: Option<Spanned<i64>>,
    pub(super) cpu_weight: Option<Spanned<i64>>,
    pub(super) io_weight: Option<Spanned<i64>>,
    pub(super) disk_io: Option<io_limits::RawIo>,
    pub(super) tenant_io: Option<io_limits::RawIo>,
    pub(super) page_cache: Option<bool>,
    pub(super) share_parent: Option<bool>,
    pub(super) mirror: Option<mirror::RawMirror>,
    pub(super) encryption: Option<bool>,
    pub(super) online_snapshot: Option<bool>,
    pub(super) cbt: Option<bool>,
    pub(super) read_cache_root: Option<Spanned<String>>,
}

/// One entry of `image_roots`: a path, or a table with the path and the
/// root's own keys (`{ path = "/srv/gold", shared_readonly = true }`).
#[derive(Debug)]
pub(super) struct RawRoot {
    pub(super) path: String,
    pub(super) shared_readonly: bool,
}

impl<'de> Deserialize<'de> for RawRoot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRoot;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path, or a table { path = \"...\", shared_readonly = true }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawRoot, E> {
                Ok(RawRoot {
                    path: v.to_string(),
                    shared_readonly: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<RawRoot, A::Error> {
                let mut path = None;
                let mut shared_readonly = None;
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "path" if path.is_none() => path = Some(m.next_value::<String>()?),
                        "shared_readonly" if shared_readonly.is_none() => {
                            shared_readonly = Some(m.next_value::<bool>()?)
                        }
                        "path" | "shared_readonly" => {
                            return Err(serde::de::Error::duplicate_field("image root key"))
                        }
                        other => {
                            return Err(serde::de::Error::unknown_field(
                                other,
                                &["path", "shared_readonly"],
                            ))
                        }
                    }
                }
                Ok(RawRoot {
                    path: path.ok_or_else(|| serde::de::Error::missing_field("path"))?,
                    shared_readonly: shared_readonly.unwrap_or(false),
                })
            }
        }
        d.deserialize_any(V)
    }
}
