//! Attacks on the offline tools through hostile images: `tap-ctl vhd` runs
//! as root on files a guest or tenant wrote, so it must follow no parent
//! locator out of the image's directory, must not take a broken VHD for
//! raw, and must parse with no way to open a path.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tapctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> Vec<u8> {
    let o = tapctl(args);
    assert!(
        o.status.success(),
        "tap-ctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Runs and must fail; returns stderr.
fn refused(args: &[&str]) -> String {
    let o = tapctl(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "tap-ctl {args:?} should fail: {err}"
    );
    err
}

/// [`refused`], with stdout first (where `check` lists its problems).
fn refused_out(args: &[&str]) -> String {
    let o = tapctl(args);
    assert_eq!(o.status.code(), Some(1), "tap-ctl {args:?} should fail");
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const SECRET: &[u8] = b"TOPSECRET-host-only-bytes-0123456789";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A VHD in `dir` holding SECRET at offset 0, standing for a host file
/// (another tenant's image, a gold master) whose UUID an attacker knows.
fn host_secret(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let secret = dir.join("secret.vhd");
    ok(&["vhd", "create", "-n", s(&secret), "-s", "4"]);
    let o = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(["vhd", "write", "-n", s(&secret), "-o", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(SECRET)?;
            c.wait()
        })
        .unwrap();
    assert!(o.success());
    secret
}

#[test]
fn convert_of_a_raw_disk_holding_a_vhd_with_an_absolute_locator_reads_no_host_file() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = host_secret(&tmp.path().join("host"));
    // The guest's raw disk holds, byte for byte, a differencing VHD whose
    // parent is the host file: its relative locator (../host/secret.vhd
    // from where it was made) leads nowhere from vm/, so only the
    // absolute locators name the secret.
    let guest = tmp.path().join("guest");
    std::fs::create_dir_all(guest.join("vm")).unwrap();
    let forged = guest.join("forged.vhd");
    ok(&["vhd", "snapshot", "-n", s(&forged), "-p", s(&secret)]);
    let disk = guest.join("vm/disk.raw");
    std::fs::rename(&forged, &disk).unwrap();

    let out = guest.join("vm/out.raw");
    let err = refused(&["vhd", "convert", s(&disk), s(&out)]);
    assert!(!out.exists(), "no output may be left behind");
    assert!(
        err.contains("absolute locators are not followed") && err.contains("--parent PATH"),
        "{err}"
    );
    // Read the image's virtual disk too: same rule.
    let err = refused(&["vhd", "read", "-n", s(&disk), "-o", "0", "-l", "512"]);
    assert!(err.contains("absolute locators are not followed"), "{err}");

    // Said to be raw, it is copied as the bytes it is: no secret in them.
    ok(&["vhd", "convert", "-f", "raw", s(&disk), s(&out)]);
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied, std::fs::read(&disk).unwrap());
    assert!(!contains(&copied, SECRET));
}

#[test]
fn parent_locator_leaving_the_directory_or_through_a_symlink_is_refused_with_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = host_secret(&tmp.path().join("elsewhere"));

    // `..`: the child in b/ records ../elsewhere/secret.vhd.
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    let up = tmp.path().join("b/child.vhd");
    ok(&["vhd", "snapshot", "-n", s(&up), "-p", s(&elsewhere)]);

    // A symlink as the parent file, and one as a directory on the way.
    let d = tmp.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::symlink(&elsewhere, d.join("link.vhd")).unwrap();
    let via_file = d.join("via-file.vhd");
    ok(&[
        "vhd",
        "snapshot",
        "-n",
        s(&via_file),
        "-p",
        s(&d.join("link.vhd")),
    ]);
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), d.join("sub")).unwrap();
    let via_dir = d.join("via-dir.vhd");
    ok(&[
        "vhd",
        "snapshot",
        "-n",
        s(&via_dir),
        "-p",
        s(&d.join("sub/secret.vhd")),
    ]);

    for (child, why) in [
        (
            &up,
            "parent path ../elsewhere/secret.vhd leaves the image's directory",
        ),
        (
            &via_file,
            "parent path link.vhd is a symlink or passes through one; images and parents \
             must be regular files, symlinks are refused",
        ),
        (
            &via_dir,
            "parent path sub/secret.vhd is a symlink or passes through one",
        ),
    ] {
        let out = tmp.path().join("out.raw");
        let err = refused(&["vhd", "convert", s(child), s(&out)]);
        assert!(!out.exists());
        assert!(err.contains(why), "{}: {err}", child.display());
        assert!(
            err.contains(
                "only relative parent locators to a file beneath the image's own directory"
            ),
            "{err}"
        );
        assert!(!err.contains("parent image:"), "{err}");
        assert!(!err.contains("os error"), "{err}");
        let err = refused_out(&["vhd", "check", "-n", s(child)]);
        assert!(err.contains("problem"), "{err}");
        assert!(err.contains(why), "{}: {err}", child.display());
        assert!(!err.contains("parent: parent image:"), "{err}");

        // Named by the user, the same parent is used.
        ok(&[
            "vhd",
            "convert",
            "--parent",
            s(&elsewhere),
            s(child),
            s(&out),
        ]);
        assert!(std::fs::read(&out).unwrap().starts_with(SECRET));
        std::fs::remove_file(&out).unwrap();
    }
}

/// A parent that is missing, a FIFO or a directory is named for what it
/// is (not "not found"), once, without a doubled "parent image:" prefix.
#[test]
fn parent_that_is_missing_a_fifo_or_a_directory_is_named_for_what_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "4"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    std::fs::remove_file(&base).unwrap();
    let check = |what: &str| {
        let out = tmp.path().join("out.raw");
        for err in [
            refused_out(&["vhd", "check", "-n", s(&child)]),
            refused(&["vhd", "convert", s(&child), s(&out)]),
        ] {
            assert!(err.contains(what), "{what}: {err}");
            assert!(err.contains("no parent of"), "{err}");
            assert!(!err.contains("not found"), "{err}");
            assert!(!err.contains("parent image:"), "{err}");
            assert!(!err.contains("os error"), "{err}");
        }
    };
    check("parent path base.vhd does not exist");
    let c = std::ffi::CString::new(s(&base)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    check("base.vhd is a FIFO, not an image file");
    std::fs::remove_file(&base).unwrap();
    std::fs::create_dir(&base).unwrap();
    check("base.vhd is a directory, not an image file");
}

#[test]
fn vhd_with_a_damaged_cookie_is_not_converted_as_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fixed.vhd");
    ok(&["vhd", "create", "--fixed", "-n", s(&img), "-s", "1"]);
    let mut b = std::fs::read(&img).unwrap();
    let n = b.len();
    b[n - 512..n - 504].copy_from_slice(b"CONECTIX");
    std::fs::write(&img, &b).unwrap();

    let out = tmp.path().join("out.raw");
    let err = refused(&["vhd", "convert", s(&img), s(&out)]);
    assert!(!out.exists());
    assert!(
        err.contains("damaged cookie") && err.contains("-f raw"),
        "{err}"
    );
    let err = refused(&["vhd", "read", "-n", s(&img), "-o", "0", "-l", "512"]);
    assert!(err.contains("damaged cookie"), "{err}");
    let err = refused(&["vhd", "convert", "-f", "vhd", s(&img), s(&out)]);
    assert!(err.contains("cookie"), "{err}");
    assert!(!out.exists());
    // The user may still say it is raw, and gets its bytes.
    ok(&["vhd", "convert", "-f", "raw", s(&img), s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), b);
}

#[test]
fn confined_parser_cannot_open_a_path() {
    let o = tapctl(&["vhd", "confine-check", "/etc/passwd"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for how in ["open", "openat2"] {
        assert!(
            text.contains(&format!(
                "{how} /etc/passwd: refused: Operation not permitted"
            )),
            "{text}"
        );
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn image_verbs_parse_in_a_child_under_seccomp_without_privileges() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("a.vhd");
    ok(&["vhd", "create", "-n", s(&img), "-s", "16"]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args([
            "vhd",
            "read",
            "-n",
            s(&img),
            "-o",
            "0",
            "-l",
            &(16 << 20).to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = c.stdout.take().unwrap();
    // The first byte comes from the parser, so it exists and is confined;
    // it cannot finish before we read the other 16 MiB.
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", c.id())).unwrap();
    let parser: u32 = children
        .split_whitespace()
        .next()
        .expect("tap-ctl has a parser child")
        .parse()
        .unwrap();
    assert_eq!(status_field(parser, "Seccomp"), "2");
    assert_eq!(status_field(parser, "NoNewPrivs"), "1");
    assert_eq!(status_field(parser, "CapEff"), "0000000000000000");
    assert_eq!(status_field(parser, "CapPrm"), "0000000000000000");
    // The parent, which opens files, parses nothing and stays as it was.
    assert_eq!(status_field(c.id(), "Seccomp"), "0");
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() + 1, 16 << 20);
    assert!(c.wait().unwrap().success());
}

/// Run tap-ctl under an address-space limit of 1 GiB (`ulimit -v`), as a
/// host with strict overcommit or a limited service would.
fn tapctl_limited(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Set slot `slot`'s parent locator `data_len` (dynamic header at 512,
/// locators at header offset 576, 24 bytes each) and fix the checksum.
fn set_locator_len(p: &Path, slot: usize, len: u32) {
    let mut b = std::fs::read(p).unwrap();
    let at = 512 + 576 + slot * 24 + 8;
    b[at..at + 4].copy_from_slice(&len.to_be_bytes());
    let h = &mut b[512..512 + 1024];
    h[36..40].fill(0);
    let sum = !h.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(p, &b).unwrap();
}

#[test]
fn check_and_repair_of_a_4gib_locator_length_allocate_nothing_of_that_size() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    ok(&["vhd", "create", "-n", s(&base), "-s", "4"]);
    ok(&["vhd", "snapshot", "-n", s(&child), "-p", s(&base)]);
    // The limit itself leaves the tools working on a sound image.
    let o = tapctl_limited(&["vhd", "check", "-n", s(&child)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for len in [u32::MAX, 0x4000_0000, 16 << 10 | 1] {
        set_locator_len(&child, 0, len);
        for verb in ["check", "repair"] {
            let o = tapctl_limited(&["vhd", verb, "-n", s(&child)]);
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{verb} {len}: {out} {err}");
            assert!(!err.contains("memory allocation"), "{verb} {len}: {err}");
            assert!(
                out.contains("parent_locator.data_len") && out.contains(&len.to_string()),
                "{verb} {len}: {out} {err}"
            );
        }
    }
}

fn footer_sum(sector: &mut [u8]) {
    sector[64..68].fill(0);
    let sum = !sector
        .iter()
        .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    sector[64..68].copy_from_slice(&sum.to_be_bytes());
}

fn write_stdin(p: &Path, offset: &str, data: &[u8]) -> std::process::ExitStatus {
    Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(["vhd", "write", "-n", s(p), "-o", offset])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait()
        })
        .unwrap()
}

#[test]
fn repair_rebuilds_both_damaged_footers_from_the_intact_header_and_never_reads_it_as_raw() {
    let tmp = tempfile::tempdir().unwrap();
    // Damage: one wrong cookie byte with the checksum fixed (the fields
    // survive), and both footers zeroed (only the header survives).
    for wipe in [false, true] {
        let p = tmp.path().join(format!("d{wipe}.vhd"));
        ok(&["vhd", "create", "-n", s(&p), "-s", "4"]);
        assert!(write_stdin(&p, "0", b"FIRST-BLOCK").success());
        assert!(write_stdin(&p, "3145728", b"SECOND-BLOCK").success());
        let size_before = ok(&["vhd", "query", "-n", s(&p), "-v"]);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        for at in [0, n - 512] {
            if wipe {
                b[at..at + 512].fill(0);
            } else {
                b[at + 3] ^= 0x20;
                footer_sum(&mut b[at..at + 512]);
            }
        }
        std::fs::write(&p, &b).unwrap();

        let err = refused(&["vhd", "read", "-n", s(&p), "-o", "0", "-l", "11"]);
        assert!(err.contains("cxsparse") || err.contains("damaged"), "{err}");
        assert_ne!(write_stdin(&p, "0", b"CLOBBER").code(), Some(0));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b,
            "a refused write changed the file"
        );

        let out = String::from_utf8(ok(&["vhd", "repair", "-n", s(&p)])).unwrap();
        assert!(out.contains("rebuilt the footer"), "{out}");
        if wipe {
            assert!(out.contains("new UUID"), "{out}");
        }
        ok(&["vhd", "check", "-n", s(&p)]);
        assert_eq!(
            ok(&["vhd", "read", "-n", s(&p), "-o", "0", "-l", "11"]),
            b"FIRST-BLOCK"
        );
        assert_eq!(
            ok(&["vhd", "read", "-n", s(&p), "-o", "3145728", "-l", "12"]),
            b"SECOND-BLOCK"
        );
        assert_eq!(ok(&["vhd", "query", "-n", s(&p), "-v"]), size_before);
        // qemu reads the repaired file as a VHD holding the same data.
        let raw = tmp.path().join("q.raw");
        let o = Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw", s(&p), s(&raw)])
            .output()
            .expect("qemu-img is needed for the interop check");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = std::fs::read(&raw).unwrap();
        assert_eq!(&r[..11], b"FIRST-BLOCK");
        assert_eq!(&r[3145728..3145740], b"SECOND-BLOCK");
    }
}

#[test]
fn repair_of_a_truncated_image_keeps_every_byte_of_the_cut_block() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.vhd");
    ok(&["vhd", "create", "-n", s(&p), "-s", "8"]);
    assert!(write_stdin(&p, "0", &[0x11; 4096]).success());
    assert!(write_stdin(&p, "2097152", &vec![0x22; 2 << 20]).success());
    assert!(write_stdin(&p, "6291456", &[0x33; 4096]).success());
    // Cut the file in the middle of the last block: its BAT entry now
    // runs past the end, and no footer is left at the end.
    let full = std::fs::read(&p).unwrap();
    let cut = full.len() - (1 << 20) - 300;
    std::fs::write(&p, &full[..cut]).unwrap();
    let o = tapctl(&["vhd", "repair", "-n", s(&p)]);
    assert_eq!(o.status.code(), Some(1), "the cut block is still short");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("repair cannot fix: bat"), "{out}");
    let after = std::fs::read(&p).unwrap();
    assert!(after.len() >= cut, "repair shrank {cut} to {}", after.len());
    // Past the two footers and the batmap it rewrote, every byte is kept.
    let first_block = 3584;
    assert_eq!(&after[first_block..cut], &full[first_block..cut]);
}
