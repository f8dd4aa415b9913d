//! Tenant policy: a pure decision function over requests and peer identity,
//! and the `policy.toml` that configures it (and the broker).
//!
//! Nothing here makes a syscall: the broker reads the file, supplies the
//! peer's `SO_PEERCRED` identity and a view of its tables, and enforces
//! what is decided (e.g. opening a granted image with `openat2`).

pub mod cbt;
pub mod cgroups;
pub mod config;
pub mod decide;
pub mod idmap;
pub mod path;
mod read_cache;
pub mod secondary;
#[cfg(test)]
mod test_fixtures;
pub mod xapi;

pub use cbt::decide_cbt_file;
pub use cgroups::{CgroupMode, CgroupPolicy, TenantCgroup};
pub use config::{
    render_warnings, Diagnostic, FrontendChoice, Policy, PolicyError, RootProbe, Tenant,
};
pub use decide::{
    decide, decide_commit_parent, decide_parent, BrokerView, Decision, ImageGrant, OpenAs,
    PeerCred, Scope,
};
pub use idmap::{IdClash, IdFiles};
pub use secondary::decide_secondary_file;
