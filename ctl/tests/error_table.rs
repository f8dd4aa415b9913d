//! The errors a user can cause with tap-ctl's offline commands, as a
//! table: each must fail, name the file (or flag) involved, and say what
//! to do next, in one line on stderr, without a panic.

mod common;

use common::{ok, tapctl};
use std::path::Path;

/// One case: the command, what the message must name, and words of the
/// next step it must give.
struct Case<'a> {
    args: Vec<&'a str>,
    names: &'a str,
    next: &'a str,
}

#[test]
fn user_errors_name_the_object_and_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (okv, raw, missing, sub, nodir) = (
        p("ok.vhd"),
        p("raw.img"),
        p("missing.vhd"),
        p("sub"),
        p("nodir/x.vhd"),
    );
    ok(&["vhd", "create", "-n", &okv, "-s", "8"], None);
    std::fs::write(&raw, vec![0x33u8; 1 << 20]).unwrap();
    std::fs::create_dir(&sub).unwrap();
    let (pol, log) = (p("missing.toml"), p("missing.jsonl"));
    let out = p("out.raw");
    let cases = [
        Case {
            args: vec!["vhd", "query", "-n", &missing],
            names: &missing,
            next: "check the path",
        },
        Case {
            args: vec!["vhd", "check", "-n", &missing],
            names: &missing,
            next: "check the path",
        },
        Case {
            args: vec!["vhd", "convert", &missing, &out],
            names: &missing,
            next: "check the path",
        },
        Case {
            args: vec!["vhd", "create", "-n", &nodir, "-s", "8"],
            names: &nodir,
            next: "create the directory first",
        },
        Case {
            args: vec!["vhd", "create", "-n", &okv, "-s", "8"],
            names: &okv,
            next: "remove it first or choose another name",
        },
        Case {
            args: vec!["vhd", "check", "-n", &raw],
            names: &raw,
            next: "attach it as aio:PATH",
        },
        Case {
            args: vec!["vhd", "query", "-n", &raw],
            names: &raw,
            next: "is not a VHD image",
        },
        Case {
            args: vec!["vhd", "repair", "-n", &raw],
            names: &raw,
            next: "is not a VHD image",
        },
        Case {
            args: vec!["vhd", "snapshot", "-n", "child.vhd", "-p", &raw],
            names: &raw,
            next: "say -m",
        },
        Case {
            args: vec!["vhd", "check", "-n", &sub],
            names: &sub,
            next: "a regular file or a block device",
        },
        Case {
            args: vec!["vhd", "coalesce", "-n", &okv],
            names: &okv,
            next: "takes a child made by `tap-ctl vhd snapshot`",
        },
        Case {
            args: vec!["vhd", "resize", "-n", &okv, "-s", "4"],
            names: &okv,
            next: "give a size of at least 8 MiB",
        },
        Case {
            args: vec!["vhd", "resize", "-n", &okv, "-s", "0"],
            names: "-s 0",
            next: "positive number of MiB",
        },
        Case {
            args: vec!["vhd", "create", "-n", "big.vhd", "-s", "99999999"],
            names: "-s 99999999",
            next: "give a size of 1..=2088960 MiB",
        },
        Case {
            args: vec!["vhd", "read", "-n", &okv, "-o", "99999999999", "-l", "1"],
            names: &okv,
            next: "give -o and -l within the disk",
        },
        Case {
            args: vec!["policy", "check", &pol],
            names: &pol,
            next: "give the path of a readable policy file",
        },
        Case {
            args: vec!["audit", "verify", &log],
            names: &log,
            next: "give the path of the broker's audit log",
        },
        Case {
            args: vec!["--socket", "/nonexistent/b.sock", "list"],
            names: "/nonexistent/b.sock",
            next: "is tap-broker running?",
        },
    ];
    let mut bad = Vec::new();
    for c in &cases {
        let o = tapctl(&c.args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        let fine = !o.status.success()
            && o.status.code() != Some(101)
            && err.starts_with("tap-ctl: ")
            && err.lines().count() == 1
            && err.contains(c.names)
            && err.contains(c.next);
        if !fine {
            bad.push(format!("{:?} ({:?}): {err}", c.args, o.status.code()));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(
        !Path::new(&out).exists(),
        "a failed convert leaves no output"
    );
    assert!(!Path::new(&p("big.vhd")).exists());
}
