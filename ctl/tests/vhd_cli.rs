//! `tap-ctl vhd ...` end to end: the binary, its flags, its output and
//! its exit codes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tapctl(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = tapctl(args, None);
    assert!(
        o.status.success(),
        "tap-ctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn query(p: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["vhd", "query", "-n", s(p), "--json"])).unwrap()
}

#[test]
fn cli_create_write_read_query_check_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "16"]);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let o = tapctl(&["vhd", "write", "-n", s(&p), "-o", "12345"], Some(&data));
    assert!(o.status.success());
    let o = tapctl(
        &["vhd", "read", "-n", s(&p), "-o", "12345", "-l", "100000"],
        None,
    );
    assert_eq!(o.stdout, data);
    let q = query(&p);
    assert_eq!(q["virtual_size"], 16 << 20);
    assert_eq!(q["type"], "dynamic");
    assert_eq!(q["parent"], serde_json::Value::Null);
    assert_eq!(q["block_size"], 2 << 20);
    assert_eq!(q["allocated_blocks"], 1);
    assert_eq!(q["physical_size"], std::fs::metadata(&p).unwrap().len());
    assert_eq!(ok(&["vhd", "query", "-n", s(&p), "-v"]).trim(), "16");
    assert!(ok(&["vhd", "check", "-n", s(&p)]).contains("is valid"));
    let o = tapctl(
        &[
            "vhd",
            "read",
            "-n",
            s(&p),
            "-o",
            &(16u64 << 20).to_string(),
            "-l",
            "1",
        ],
        None,
    );
    assert!(!o.status.success());
}

#[test]
fn cli_snapshot_coalesce_resize_set_parent_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "8", "--fixed"]);
    assert_eq!(query(&base)["type"], "fixed");
    tapctl(
        &["vhd", "write", "-n", s(&base), "-o", "0"],
        Some(b"base data"),
    );
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    let q = query(&child);
    assert_eq!(q["type"], "differencing");
    assert_eq!(q["virtual_size"], 8 << 20);
    assert!(q["parent"].as_str().unwrap().ends_with("base.vhd"));
    tapctl(
        &["vhd", "write", "-n", s(&child), "-o", "5"],
        Some(b"CHILD"),
    );
    let o = tapctl(
        &["vhd", "read", "-n", s(&child), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");

    let moved = tmp.path().join("moved-base.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&child)], None);
    assert!(!o.status.success());
    ok(&["vhd", "set-parent", "-n", s(&child), "-p", s(&moved)]);
    ok(&["vhd", "check", "-n", s(&child)]);

    let out = ok(&["vhd", "coalesce", "-n", s(&child)]);
    assert!(out.contains("moved-base.vhd"), "{out}");
    let o = tapctl(
        &["vhd", "read", "-n", s(&moved), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");

    ok(&["vhd", "resize", "-n", s(&moved), "-s", "20"]);
    assert_eq!(query(&moved)["virtual_size"], 20 << 20);
    let o = tapctl(&["vhd", "resize", "-n", s(&moved), "-s", "10"], None);
    assert!(!o.status.success());

    let raw = tmp.path().join("x.raw");
    ok(&["vhd", "convert", "-O", "raw", s(&moved), s(&raw)]);
    let r = std::fs::read(&raw).unwrap();
    assert_eq!(r.len(), 20 << 20);
    assert_eq!(&r[..12], b"base CHILD\0\0");
    let back = tmp.path().join("back.vhd");
    ok(&["vhd", "convert", "-O", "vhd", s(&raw), s(&back)]);
    assert_eq!(query(&back)["type"], "dynamic");
    assert_eq!(query(&back)["allocated_blocks"], 1);
    let o = tapctl(
        &["vhd", "read", "-n", s(&back), "-o", "0", "-l", "12"],
        None,
    );
    assert_eq!(o.stdout, b"base CHILD\0\0");
}

#[test]
fn cli_check_lists_problems_and_fails_on_a_damaged_image() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    // Point two BAT entries past the end of the file.
    let mut b = std::fs::read(&p).unwrap();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    b[1540..1544].copy_from_slice(&0x00ff_1000u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let o = tapctl(&["vhd", "check", "-n", s(&p)], None);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().filter(|l| l.contains("bat:")).count(),
        2,
        "{out}"
    );
    let o = tapctl(&["vhd", "query", "-n", s(&p)], None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.vhd") && err.contains("tap-ctl vhd check"),
        "{err}"
    );
    let o = tapctl(
        &["vhd", "query", "-n", s(&tmp.path().join("nope.vhd"))],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}

fn stderr_of(args: &[&str]) -> (Option<i32>, String) {
    let o = tapctl(args, None);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_errors_say_each_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("nope.vhd");
    let (code, err) = stderr_of(&["vhd", "query", "-n", s(&p)]);
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn cli_snapshot_errors_name_the_parent_when_the_parent_is_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let child = tmp.path().join("child.vhd");
    let missing = tmp.path().join("missing.vhd");
    let (code, err) = stderr_of(&["vhd", "snapshot", "-n", s(&child), "-p", s(&missing)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
    assert!(
        !err.contains(&format!("{} does not exist", child.display())),
        "{err}"
    );
    let not_vhd = tmp.path().join("plain.raw");
    std::fs::write(&not_vhd, vec![0u8; 4096]).unwrap();
    let (_, err) = stderr_of(&["vhd", "snapshot", "-n", s(&child), "-p", s(&not_vhd)]);
    assert!(
        err.contains(&format!("{} is not a VHD image", not_vhd.display())),
        "{err}"
    );
    assert!(!child.exists());
}

#[test]
fn cli_read_past_the_end_fails_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    for (off, len) in [
        ("5", "18446744073709551615"),
        ("8388000", "1000"),
        ("18446744073709551615", "2"),
    ] {
        let o = tapctl(&["vhd", "read", "-n", s(&p), "-o", off, "-l", len], None);
        assert_eq!(o.status.code(), Some(1), "{off} {len}");
        assert!(
            o.stdout.is_empty(),
            "{off} {len}: {} bytes written",
            o.stdout.len()
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("8388608"), "{err}");
    }
}

#[test]
fn cli_convert_and_create_refuse_an_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    tapctl(&["vhd", "write", "-n", s(&p), "-o", "0"], Some(b"keep me"));
    let before = std::fs::read(&p).unwrap();
    let (code, err) = stderr_of(&["vhd", "convert", s(&p), s(&p)]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");
    let (code, err) = stderr_of(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn cli_vhd_tools_on_a_fifo_fail_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&f).status().unwrap().success());
    for verb in ["query", "check", "coalesce"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
            .args(["vhd", verb, "-n", s(&f)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("tap-ctl vhd {verb} on a FIFO hung");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(1), "{verb}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            err.contains("is a FIFO, not an image file"),
            "{verb}: {err}"
        );
    }
}

#[test]
fn cli_coalesce_into_a_read_only_parent_names_the_parent() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "8"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&child, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Root may write a 0444 file: act as nobody then.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut c = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_tap-ctl"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
    };
    let o = c
        .args(["vhd", "coalesce", "-n", s(&child)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}, the parent of {}, cannot be opened for writing",
            base.display(),
            child.display()
        )),
        "{err}"
    );
}

#[test]
fn cli_refused_arguments_are_said_without_a_vague_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, err) = stderr_of(&["vhd", "query", "-n", "/dev/zero"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "tap-ctl: invalid argument: /dev/zero is a character device, not an image file (a regular file or a block device)"
    );
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    let (_, err) = stderr_of(&["vhd", "resize", "-n", s(&p), "-s", "4"]);
    assert!(
        err.starts_with(&format!(
            "tap-ctl: {}: invalid argument: shrinking from",
            p.display()
        )),
        "{err}"
    );
}

/// tap-ctl with `stdin` fed from a thread (it may stop reading early).
fn tapctl_fed(args: &[&str], stdin: Vec<u8>, fsize: Option<u64>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = fsize {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                // Growing the file past `limit` fails with EFBIG (the
                // signal it would also raise is ignored).
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn read_back(p: &Path, offset: u64, len: u64) -> Vec<u8> {
    let o = tapctl(
        &[
            "vhd",
            "read",
            "-n",
            s(p),
            "-o",
            &offset.to_string(),
            "-l",
            &len.to_string(),
        ],
        None,
    );
    assert!(o.status.success());
    o.stdout
}

#[test]
fn cli_write_past_the_end_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "16"]);
    // 6 MiB at 12 MiB of a 16 MiB disk: the first 4 MiB would fit.
    let data = vec![0xabu8; 6 << 20];
    let o = tapctl_fed(
        &[
            "vhd",
            "write",
            "-n",
            s(&p),
            "-o",
            &(12u64 << 20).to_string(),
        ],
        data,
        None,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("past the end") && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(read_back(&p, 12 << 20, 4 << 20), vec![0u8; 4 << 20]);
    assert_eq!(query(&p)["allocated_blocks"], 0);
}

#[test]
fn cli_write_input_of_the_wrong_length_or_too_long_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "100"]);
    let before = std::fs::read(&p).unwrap();
    let w = |len: Option<&str>, data: Vec<u8>| {
        let mut args = vec!["vhd", "write", "-n", s(&p), "-o", "0"];
        if let Some(l) = len {
            args.extend(["-l", l]);
        }
        let o = tapctl_fed(&args, data, None);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = w(Some("1000"), vec![1u8; 999]);
    assert!(err.contains("held 999 bytes, not the 1000"), "{err}");
    let err = w(Some("1000"), vec![1u8; 1001]);
    assert!(err.contains("held 1001 bytes, not the 1000"), "{err}");
    let err = w(None, vec![1u8; (64 << 20) + 1]);
    assert!(err.contains("more than 67108864 bytes"), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    let err = w(Some("67108865"), Vec::new());
    assert!(err.contains("more than tap-ctl vhd write takes"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // Exactly as long as promised: written.
    let o = tapctl_fed(
        &["vhd", "write", "-n", s(&p), "-o", "7", "-l", "3"],
        b"abc".to_vec(),
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_back(&p, 6, 5), b"\0abc\0");
}

#[test]
fn cli_write_failing_half_way_puts_the_old_contents_back() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "16"]);
    let old: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let o = tapctl_fed(&["vhd", "write", "-n", s(&p), "-o", "0"], old.clone(), None);
    assert!(o.status.success());
    // 6 MiB over three 2 MiB blocks; the file may grow by one more block
    // only, so the third block's allocation fails after the second's
    // data is in.
    let len = std::fs::metadata(&p).unwrap().len();
    let new = vec![0x5au8; 6 << 20];
    let o = tapctl_fed(
        &["vhd", "write", "-n", s(&p), "-o", "0"],
        new,
        Some(len + (2 << 20) + (64 << 10)),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("previous contents were written back"), "{err}");
    let mut want = old;
    want.resize(6 << 20, 0);
    assert!(
        read_back(&p, 0, 6 << 20) == want,
        "part of the input was kept"
    );
    ok(&["vhd", "check", "-n", s(&p)]);
}

#[test]
fn cli_query_escapes_parent_names_read_from_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    // The image's author picked the parent's name: it clears the screen.
    let base = tmp.path().join("b\x1b[2J\x1b]0;x\x07ase.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "8"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    for args in [
        vec!["vhd", "query", "-n", s(&child), "-p"],
        vec!["vhd", "query", "-n", s(&child)],
    ] {
        let out = ok(&args);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert!(out.contains("b\\x1b[2J\\x1b]0;x\\x07ase.vhd"), "{out}");
    }
    // JSON keeps the real name (serde escapes it).
    let q = query(&child);
    assert!(q["parent"]
        .as_str()
        .unwrap()
        .ends_with("b\x1b[2J\x1b]0;x\x07ase.vhd"));
}

#[test]
fn cli_create_size_zero_or_past_64_bits_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vhd");
    let p = p.to_str().unwrap();
    let out = tapctl(&["vhd", "create", "-n", p, "-s", "0"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive number of MiB"));
    let out = tapctl(&["vhd", "create", "-n", p, "-s", "99999999999999"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-s 99999999999999: a VHD holds at most 2088960 MiB"),
        "{err}"
    );
    assert!(!std::path::Path::new(p).exists());
}
