//! The parts of `tap-ctl` that other crates' tests use too: the offline
//! tools' file handling ([`files`]). The engine (`tapjail-image`) never
//! opens a path; the tool that runs it does, here.

pub mod files;
