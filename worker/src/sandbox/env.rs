//! Step 2: clear the environment.
//!
//! Nothing in the worker reads environment variables on purpose except
//! `TAPJAIL_LOG` (the broker's log filter, read by `logging::init` before
//! this step), and some
//! libraries do by accident (`MALLOC_*`, `RUST_*`, locale). A hostile broker
//! environment must not steer the worker, and the worker must not carry
//! secrets from the spawner. Called while the process is single-threaded,
//! which is what makes `remove_var` sound.

/// Remove every environment variable.
pub fn clear() {
    let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for name in names {
        std::env::remove_var(name);
    }
}
