//! Child processes with a bound: a hang fails the test with a message
//! instead of hanging the suite.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Run `cmd` with stdout and stderr captured; panic (after SIGKILLing it)
/// if it has not exited within `limit`. Waits on the child's exit itself,
/// not by polling, and reads its output while it runs, so a chatty child
/// cannot block on a full pipe.
#[track_caller]
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which the waiting thread
            // has not reaped (it would have sent its output by now).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = rx.recv();
            panic!("{cmd:?} still running after {limit:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_returns_output_and_fails_on_a_hang() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo hi"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.stdout, b"hi\n");
        let r = std::panic::catch_unwind(|| {
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(200))
        });
        let e = r.expect_err("a hang must fail");
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("still running"), "{msg}");
    }
}
