//! The tap-ctl runner the `tap-ctl vhd` test files share (a module of each
//! test target that declares `mod common;`; not every target uses all).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Run this build's tap-ctl with `args`, feeding `stdin` (or nothing).
pub fn tapctl(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    if let Some(d) = stdin {
        input.write_all(d).unwrap();
    }
    drop(input);
    c.wait_with_output().unwrap()
}

/// [`tapctl`] that must succeed; its stdout.
pub fn ok(args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let o = tapctl(args, stdin);
    assert!(
        o.status.success(),
        "tap-ctl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
