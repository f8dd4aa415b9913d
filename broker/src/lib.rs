//! The broker's library half: what `tap-broker` is built from, exposed so
//! the integration tests can drive single pieces (a device backend) too.

pub mod cgroup;
pub mod device;
pub mod fdstore;
pub mod phases;
pub mod self_confine;
pub mod spawn;
pub mod sys;
pub mod worker_root;
