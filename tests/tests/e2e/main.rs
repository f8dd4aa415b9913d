//! End-to-end tests: a real tap-broker, real tapdisk workers (the fake one
//! only where a test must force a worker's behaviour), tap-ctl run as
//! several tenants. Needs root.

mod admin_kicks;
mod audit_flood;
mod audit_full;
mod audit_rotation;
mod cbt;
mod cgroup;
mod cgroup_bounds;
mod ctlplane;
mod deadlines;
mod escapes;
mod faults;
mod hostile_worker;
mod image_open;
mod kill_under_load;
mod mirror;
mod nbd_kernel;
mod qos;
mod qos_fuse;
mod qos_ublk;
mod raw_parent;
mod robustness;
mod seed;
mod soak_ublk;
mod tenants;
mod ublk;
mod worker_confinement;
mod worker_log;
mod xapi;

pub use tapjail_tests::*;
