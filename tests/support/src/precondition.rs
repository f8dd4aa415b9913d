//! Test preconditions: a test that cannot run here says so, and under
//! `CI=true` it fails instead, so a CI run can never turn green by skipping.

use std::process::{Command, Stdio};

/// Whether this run is a CI run (`CI=true`, as CI services set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Check a test's precondition. `true` when it holds. When it does not:
/// under `CI=true` panic (the test fails, naming what was missing);
/// otherwise print `SKIPPED: what` and return `false`, so the caller
/// returns at once.
#[track_caller]
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if in_ci() {
        panic!("precondition missing under CI=true (a CI run must not skip): {what}");
    }
    eprintln!("SKIPPED: {what} (this would fail under CI=true)");
    false
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `prog` is on PATH. Says nothing; pass the answer to
/// [`require`].
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_holds_or_skips_or_fails_under_ci() {
        assert!(require(true, "nothing"));
        let r = std::panic::catch_unwind(|| require(false, "a missing thing"));
        if in_ci() {
            let e = r.expect_err("must fail under CI");
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("a missing thing"), "{msg}");
        } else {
            assert_eq!(r.ok(), Some(false));
        }
    }

    #[test]
    fn have_finds_sh_and_not_a_made_up_program() {
        assert!(have("sh"));
        assert!(!have("tapjail-no-such-program-xyz"));
    }
}
