//! How the broker opens images (issue 11 items 2 and 9, issue 12's one
//! writer per image): with the tenant's own credentials, only her own
//! single-link files, never across a mount point, within a deadline, and
//! under qemu-compatible locks.

use crate::*;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes no message may ever show.
const MARK: &[u8; 8] = b"SECRET!!";

/// `fs.protected_hardlinks` set to 0 while this lives (the kernel's
/// default unless a sysctl.d file sets it), restored on drop; the window
/// is one `ln`.
struct HardlinksUnprotected(String);

impl HardlinksUnprotected {
    const PATH: &'static str = "/proc/sys/fs/protected_hardlinks";
    fn new() -> Self {
        let old = std::fs::read_to_string(Self::PATH).expect("read protected_hardlinks");
        std::fs::write(Self::PATH, "0").expect("set protected_hardlinks=0");
        HardlinksUnprotected(old.trim().to_string())
    }
}

impl Drop for HardlinksUnprotected {
    fn drop(&mut self) {
        std::fs::write(Self::PATH, &self.0).expect("restore protected_hardlinks");
    }
}

/// `ln TARGET LINK` run as `t`.
fn ln_as(t: &TenantSpec, target: &Path, link: &Path) -> std::process::Output {
    Command::new("ln")
        .arg(target)
        .arg(link)
        .uid(t.uid)
        .gid(t.gid)
        .output()
        .expect("ln")
}

/// The confirmed attack: alice hard-links a root-only file into her image
/// root and asks for it as a raw disk (which used to be served to her
/// read-write) and as a VHD (whose error used to quote its bytes).
#[test]
fn image_open_tenant_hard_link_to_a_root_only_file_is_refused_and_leaks_nothing() {
    let h = Harness::start(Options::default());
    let a = h.root("alice");
    let secret = h.dir.path().join("shadow");
    std::fs::write(&secret, MARK.repeat(8192)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = a.join("disk.img");
    // alice's root is root's here; she gets a directory of her own in it
    // (as /home/alice/vms would be).
    let mine = a.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    // She cannot make the link while the kernel protects hard links...
    if std::fs::read_to_string(HardlinksUnprotected::PATH)
        .unwrap()
        .trim()
        == "1"
    {
        assert!(!ln_as(&ALICE, &secret, &mine.join("tried")).status.success());
    }
    // ...and can where it does not.
    let link_in_mine = mine.join("disk.img");
    {
        let _g = HardlinksUnprotected::new();
        let out = ln_as(&ALICE, &secret, &link_in_mine);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::hard_link(&secret, &link).unwrap();
    for path in [&link_in_mine, &link] {
        for kind in ["aio", "vhd"] {
            for ro in [false, true] {
                let spec = format!("{kind}:{}", path.display());
                let mut args = vec!["create", "-a", &spec];
                if ro {
                    args.push("-R");
                }
                let err = h.fails(&ALICE, &args);
                assert!(
                    err.contains("permission denied for uid 4242"),
                    "{args:?}: {err}"
                );
                assert!(!err.as_bytes().windows(4).any(|w| w == &MARK[..4]), "{err}");
            }
        }
    }
    // Readable by her (0644) but still root's: not handed over either.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    for ro in [false, true] {
        let spec = format!("vhd:{}", link.display());
        let mut args = vec!["create", "-a", &spec];
        if ro {
            args.push("-R");
        }
        let err = h.fails(&ALICE, &args);
        let why = if ro {
            "owned by uid 0"
        } else {
            "permission denied for uid 4242"
        };
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Her own file with a second name is refused too.
    let two = h.raw_image("alice", "two.img", 1 << 20);
    std::fs::hard_link(&two, h.dir.path().join("second-name")).unwrap();
    let err = h.fails(&ALICE, &["create", "-a", &format!("aio:{}", two.display())]);
    assert!(err.contains("has 2 hard links"), "{err}");
    // Nothing was served, and no audit line carries the file's bytes.
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    let audit = std::fs::read(&h.audit).unwrap();
    assert!(!audit.windows(4).any(|w| w == &MARK[..4]));
    let denied = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["rule"] == "broker-check")
        .count();
    assert!(denied >= 11, "every refusal audited ({denied})");
    // Her own file still works.
    let ok = h.raw_image("alice", "ok.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", ok.display())]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

/// A dead FUSE mount for one test: detached, then its connection closed
/// (which fails whatever still waits on it), on drop.
struct Mount(std::path::PathBuf, Option<std::fs::File>);

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

impl Mount {
    /// A FUSE filesystem at `at` served by nobody: every request on it
    /// waits until `fuse` is closed.
    fn dead_fuse(at: &Path, fuse: std::fs::File) -> Mount {
        let t = cpath(at);
        let data = std::ffi::CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            fuse.as_raw_fd()
        ))
        .unwrap();
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tapjail-dead".as_ptr(),
                t.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "fuse mount: {}", std::io::Error::last_os_error());
        Mount(at.to_path_buf(), Some(fuse))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let t = cpath(&self.0);
        // SAFETY: umount2(2) with a valid path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        drop(self.1.take());
    }
}

/// `/dev/fuse`, or `None` (skip, said loudly; a failure under `CI=true`,
/// whichever way CI spells it: `require`).
fn open_fuse() -> Option<std::fs::File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(f) => Some(f),
        Err(e) => {
            tapjail_testsupport::require(false, &format!("/dev/fuse is needed: {e}"));
            None
        }
    }
}

/// Item 9: a FUSE filesystem that never answers, mounted under alice's
/// root, is not crossed; mounted over her root itself, her create ends at
/// the open deadline with a clear message, and bob is served meanwhile.
#[test]
fn image_open_a_dead_fuse_mount_cannot_hang_the_broker() {
    let Some(fuse) = open_fuse() else { return };
    let fuse2 = open_fuse().unwrap();
    let h = Arc::new(Harness::start(Options {
        worker_timeout_secs: 3,
        ..Options::default()
    }));
    let a = h.root("alice");
    std::fs::create_dir(a.join("mnt")).unwrap();
    let under = Mount::dead_fuse(&a.join("mnt"), fuse);
    let started = Instant::now();
    let err = h.fails(
        &ALICE,
        &["create", "-a", &format!("aio:{}/mnt/x.img", a.display())],
    );
    assert!(err.contains("crosses a mount point"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(under);

    let over = Mount::dead_fuse(&a, fuse2);
    let h2 = h.clone();
    let path = format!("aio:{}/x.img", a.display());
    let started = Instant::now();
    let stuck = std::thread::spawn(move || h2.fails(&ALICE, &["create", "-a", &path]));
    // The open helper (a child of tap-broker's image opener, or of
    // tap-broker itself) is blocked in openat2 (syscall 437) on the dead
    // filesystem...
    let broker = h.broker_pid();
    let helper_running = || {
        let kids = children_of(broker);
        let grandkids: Vec<u32> = kids.iter().flat_map(|k| children_of(*k)).collect();
        kids.into_iter().chain(grandkids).any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/syscall"))
                .is_ok_and(|c| c.starts_with("437 "))
        })
    };
    assert!(
        eventually(Duration::from_secs(3), helper_running),
        "no open helper seen"
    );
    // ...while bob creates, lists and destroys.
    let b = h.raw_image("bob", "b.img", 1 << 20);
    h.ok(&BOB, &["create", "-a", &format!("aio:{}", b.display())]);
    let rows: serde_json::Value = serde_json::from_str(&h.ok(&BOB, &["list", "--json"])).unwrap();
    assert_eq!(rows[0]["file"], b.to_str().unwrap(), "{rows}");
    h.ok(&BOB, &["destroy", "-m", &rows[0]["minor"].to_string()]);
    let bob_done = started.elapsed();
    let err = stuck.join().unwrap();
    let took = started.elapsed();
    assert!(
        bob_done < Duration::from_secs(3),
        "bob waited for alice's open: {bob_done:?}"
    );
    assert!(
        err.contains("took longer than 3 s") && err.contains("not answering"),
        "{err}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(
        eventually(Duration::from_secs(3), || !helper_running()),
        "the helper was killed and reaped"
    );
    assert_eq!(
        h.ok(&ROOT, &["list"]),
        "",
        "alice's refused create left nothing"
    );
    drop(over);
}

fn qemu_io(args: &[&str]) -> std::process::Output {
    Command::new("qemu-io")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("qemu-io (qemu-utils) is needed")
}

/// Issue 12: qemu cannot write an image tapjail serves, nor the parent of
/// a served differencing image; reading alongside is allowed.
#[test]
fn image_open_qemu_cannot_write_what_tapjail_serves() {
    let h = Harness::start(Options::default());
    let raw = h.raw_image("alice", "a.img", 1 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", raw.display())]);
    let r = raw.to_str().unwrap();
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", r]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Failed to get \"write\" lock"),
        "{err}"
    );
    let base = h.vhd_image("alice", "base.vhd", 8);
    let child = h.root("alice").join("child.vhd");
    h.vhd_snapshot(&child, &base);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", child.display())],
    );
    let out = qemu_io(&["-f", "vpc", "-c", "write 0 4k", base.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Failed to get \"write\" lock"),
        "{err}"
    );
    // qemu may read the parent (it is shared read-only).
    let out = qemu_io(&["-r", "-f", "vpc", "-c", "read 0 4k", base.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    h.ok(&ALICE, &["destroy", "-m", "1"]);
    // Released: qemu may write now (a stopped worker's io_uring may hold
    // the file for a moment after its exit; the kernel then drops it).
    let write = || {
        qemu_io(&["-f", "raw", "-c", "write 0 4k", r])
            .status
            .success()
    };
    assert!(eventually(Duration::from_secs(2), write));
}

/// `qemu-io IMAGE` holding the image open for writing until dropped.
struct QemuHolder(std::process::Child);

impl QemuHolder {
    fn hold(image: &Path) -> QemuHolder {
        let mut c = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-io");
        // It has the image open (and locked) once it answers a command.
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"read 0 512\n").unwrap();
        stdin.flush().unwrap();
        c.stdin = Some(stdin);
        let mut out = BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("read 512/512 bytes") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io ended");
        }
        QemuHolder(c)
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Issue 12: an image qemu holds open for writing is refused, naming the
/// image and the holder; once qemu lets go it opens.
#[test]
fn image_open_refuses_an_image_qemu_holds_and_names_the_holder() {
    let h = Harness::start(Options::default());
    let raw = h.raw_image("alice", "held.img", 1 << 20);
    let spec = format!("aio:{}", raw.display());
    let q = QemuHolder::hold(&raw);
    let pid = q.0.id();
    for ro in [false, true] {
        let mut args = vec!["create", "-a", &spec];
        if ro {
            args.push("-R");
        }
        let err = h.fails(&ALICE, &args);
        assert!(
            err.contains(raw.to_str().unwrap())
                && err.contains("in use")
                && err.contains(&format!("qemu-io (pid {pid})")),
            "{args:?}: {err}"
        );
    }
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    drop(q);
    h.ok(&ALICE, &["create", "-a", &spec]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

/// Issue 12: two brokers (separate state dirs, one image root between
/// them) cannot both open one image writable, nor write the parent of a
/// chain the other serves; they may share read-only opens.
#[test]
fn image_open_two_brokers_cannot_both_write_one_image() {
    let h1 = Harness::start(Options::default());
    let shared = h1.root("alice");
    let h2 = Harness::start(Options {
        tenants: vec![ROOT],
        extra: format!(
            "[[tenant]]\nname = \"alice\"\nuids = [{}]\nimage_roots = [{shared:?}]\nwritable = true\n",
            ALICE.uid
        ),
        ..Options::default()
    });
    let img = h1.raw_image("alice", "one.img", 1 << 20);
    let spec = format!("aio:{}", img.display());
    h1.ok(&ALICE, &["create", "-a", &spec]);
    let worker: serde_json::Value =
        serde_json::from_str(&h1.ok(&ALICE, &["list", "--json"])).unwrap();
    let wpid = worker[0]["pid"].as_u64().unwrap();
    for ro in [false, true] {
        let mut args = vec!["create", "-a", &spec];
        if ro {
            args.push("-R");
        }
        let err = h2.fails(&ALICE, &args);
        assert!(
            err.contains(img.to_str().unwrap()) && err.contains(&format!("tapdisk (pid {wpid})")),
            "{args:?}: {err}"
        );
    }
    assert_eq!(h2.ok(&ROOT, &["list"]), "");
    // A chain served by one: the other may read its parent, not write it.
    let base = h1.vhd_image("alice", "base.vhd", 8);
    let child = shared.join("child.vhd");
    h1.vhd_snapshot(&child, &base);
    h1.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", child.display())],
    );
    let base_spec = format!("vhd:{}", base.display());
    let err = h2.fails(&ALICE, &["create", "-a", &base_spec]);
    assert!(err.contains("in use") && err.contains("tapdisk"), "{err}");
    h2.ok(&ALICE, &["create", "-a", &base_spec, "-R"]);
    h2.ok(&ALICE, &["destroy", "-m", "0"]);
    // Released by the first, the image opens on the second.
    h1.ok(&ALICE, &["destroy", "-m", "0"]);
    h2.ok(&ALICE, &["create", "-a", &spec]);
    h2.ok(&ALICE, &["destroy", "-m", "0"]);
    h1.ok(&ALICE, &["destroy", "-m", "1"]);
}

/// The image opener (`tap-broker --open-helper`) forks every open helper;
/// the attack is on what a long-lived process could keep between
/// requests: bob asks for his own file behind a directory only alice may
/// search, right after each of alice's opens. Only her credentials could
/// reach it, so any left over from her open would hand it to him. Also
/// with the opener killed (it is started again, or the broker forks the
/// helper itself); the opener never takes anyone's credentials and keeps
/// only the capabilities to take them.
#[test]
fn image_open_credentials_never_carry_over_to_the_next_request() {
    let h = Harness::start(Options::default());
    let broker = h.broker_pid();
    let opener = || children_of(broker).into_iter().find(|p| is_opener(*p));
    let first = opener().expect("tap-broker runs an image opener");
    let mine = h.raw_image("alice", "mine.img", 1 << 20);
    let behind = h.root("bob").join("alice-only");
    std::fs::create_dir(&behind).unwrap();
    std::os::unix::fs::chown(&behind, Some(ALICE.uid), Some(ALICE.gid)).unwrap();
    std::fs::set_permissions(&behind, std::fs::Permissions::from_mode(0o700)).unwrap();
    let his = behind.join("b.img");
    std::fs::File::create(&his)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::os::unix::fs::chown(&his, Some(BOB.uid), Some(BOB.gid)).unwrap();
    // Writable by all: only the directory keeps bob's credentials out,
    // so alice's (or root's) would open it read-write.
    std::fs::set_permissions(&his, std::fs::Permissions::from_mode(0o666)).unwrap();
    let his_spec = format!("aio:{}", his.display());
    for round in 0..4 {
        if round == 2 {
            // SAFETY: kill(2) on the opener's pid found above.
            unsafe { libc::kill(first as i32, libc::SIGKILL) };
            assert!(eventually(Duration::from_secs(5), || !alive(first)));
        }
        let dev = h.ok(
            &ALICE,
            &["create", "-a", &format!("aio:{}", mine.display())],
        );
        let err = h.fails(&BOB, &["create", "-a", &his_spec]);
        assert!(
            err.contains("permission denied for uid 4343"),
            "round {round}: {err}"
        );
        let minor = dev.trim().rsplit("tapdev").next().unwrap().to_string();
        h.ok(&ALICE, &["destroy", "-m", &minor]);
    }
    // After the kill the next open started a new opener; it, too, holds
    // root's own filesystem ids (fsuid is the Uid line's fourth field).
    let second = opener().unwrap_or_else(|| panic!("no new image opener:\n{}", h.broker_log()));
    assert_ne!(second, first);
    let status = std::fs::read_to_string(format!("/proc/{second}/status")).unwrap();
    let fs_ids = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().nth(3))
            .map(str::to_string)
    };
    assert_eq!(fs_ids("Uid:").as_deref(), Some("0"), "{status}");
    assert_eq!(fs_ids("Gid:").as_deref(), Some("0"), "{status}");
    // It (and so each helper it forks) holds CAP_SETGID and CAP_SETUID
    // alone: no DAC override that could open what the tenant cannot.
    assert!(status.contains("CapEff:\t00000000000000c0"), "{status}");
    assert!(status.contains("CapPrm:\t00000000000000c0"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Bob's file is fine once he can reach it.
    std::fs::set_permissions(&behind, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.ok(&BOB, &["create", "-a", &his_spec]);
}
