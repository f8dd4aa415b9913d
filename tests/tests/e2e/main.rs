//! End-to-end tests: a real tap-broker, real tapdisk workers (the fake one
//! only where a test must force a worker's behaviour), tap-ctl run as
//! several tenants. Needs root.

mod seed;

pub use tapjail_tests::*;
