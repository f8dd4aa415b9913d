//! Escapes out of a tenant's image root are refused: `..`, symlinks
//! (absolute, relative, through a directory), FIFOs and directories, and
//! parent images located outside the roots. Every refusal is audited.

use crate::*;
use std::os::unix::fs::symlink;

fn last_decision(h: &Harness) -> serde_json::Value {
    h.audit_lines().pop().expect("audit line")
}

#[test]
fn escapes_dotdot_and_symlinks_are_refused_and_audited() {
    let h = Harness::start(Options::default());
    let a = h.root("alice");
    h.raw_image("bob", "b.img", 1 << 20);
    h.raw_image("alice", "a.img", 1 << 20);
    symlink("../bob/b.img", a.join("rel-link.img")).unwrap();
    symlink(h.root("bob").join("b.img"), a.join("abs-link.img")).unwrap();
    symlink("a.img", a.join("inside-link.img")).unwrap();
    symlink(h.root("bob"), a.join("bobdir")).unwrap();
    symlink("/proc/self/root/etc", a.join("magic")).unwrap();
    std::fs::create_dir(a.join("sub")).unwrap();
    rustix_mkfifo(&a.join("fifo.img"));
    h.own(&a.join("fifo.img"));

    let cases: Vec<(String, &str)> = vec![
        (format!("{}/../bob/b.img", a.display()), "'..'"),
        (format!("{}/sub/../../bob/b.img", a.display()), "'..'"),
        (format!("{}/rel-link.img", a.display()), "symlink"),
        (format!("{}/abs-link.img", a.display()), "symlink"),
        (format!("{}/inside-link.img", a.display()), "symlink"),
        (format!("{}/bobdir/b.img", a.display()), "symlink"),
        (format!("{}/magic/passwd", a.display()), "symlink"),
        (format!("{}/fifo.img", a.display()), "not a regular file"),
        (format!("{}/sub", a.display()), "directory"),
        (
            "/etc/passwd".to_string(),
            "outside tenant alice's image roots",
        ),
        (
            format!("{}/b.img", h.root("bob").display()),
            "outside tenant alice's image roots",
        ),
    ];
    for (path, why) in &cases {
        let err = h.fails(&ALICE, &["create", "-a", &format!("aio:{path}")]);
        assert!(err.contains(why), "{path}: {err}");
        let l = last_decision(&h);
        assert_eq!(l["event"], "request", "{l}");
        if !why.contains("regular") && !why.contains("directory") {
            assert_eq!(l["decision"], "deny", "{path}: {l}");
        }
        assert_eq!(l["peer"]["uid"], ALICE.uid);
    }
    // A relative path climbing out of the caller's directory is no better.
    let out = std::process::Command::new(bin("tap-ctl"))
        .current_dir(&a)
        .uid(ALICE.uid)
        .gid(ALICE.gid)
        .args([
            "--socket",
            h.socket.to_str().unwrap(),
            "create",
            "-a",
            "aio:../bob/b.img",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'..'"));
    // Nothing was allocated or left behind by any of it.
    assert_eq!(h.ok(&ROOT, &["list"]), "");
    // The legitimate file still works.
    h.ok(
        &ALICE,
        &["create", "-a", &format!("aio:{}/a.img", a.display())],
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

#[test]
fn escapes_root_swapped_for_a_symlink_is_refused() {
    let h = Harness::start(Options::default());
    // alice's root lives in a directory she controls (as /home/alice/vms
    // would): she moves it away and puts a symlink to a directory with a
    // file only root may read in its place.
    let a = h.root("alice");
    let victim = h.dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("secret"), vec![0x42u8; 1 << 20]).unwrap();
    std::fs::set_permissions(
        victim.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::rename(&a, h.dir.path().join("alice-moved")).unwrap();
    symlink(&victim, &a).unwrap();
    let path = format!("aio:{}/secret", a.display());
    let err = h.fails(&ALICE, &["create", "-a", &path]);
    assert!(err.contains("reached through a symlink"), "{err}");
    let l = last_decision(&h);
    assert_eq!(
        (&l["decision"], &l["rule"]),
        (&"deny".into(), &"broker-check".into()),
        "{l}"
    );
    assert_eq!(h.ok(&ROOT, &["list"]), "");
}

fn rustix_mkfifo(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

use std::os::unix::process::CommandExt;

/// Parent opens go through the broker's policy: the fake worker asks for
/// the parent named at the start of its image (the real VHD engine asks
/// for the locators it parses; see the VHD chain test).
#[test]
fn escapes_parent_outside_roots_is_refused_inside_is_opened_read_only() {
    let h = Harness::start(Options {
        worker: WorkerBin::Fake,
        ..Options::default()
    });
    let a = h.root("alice");
    std::fs::create_dir(a.join("vms")).unwrap();
    h.raw_image("bob", "secret.img", 1 << 20);
    h.raw_image("alice", "base.img", 1 << 20);
    symlink("base.img", a.join("base-link.img")).unwrap();
    let leaf = |name: &str, parent: &str| {
        let p = a.join("vms").join(name);
        std::fs::write(&p, format!("PARENT:{parent}\n")).unwrap();
        h.own(&p);
        format!("aio:{}", p.display())
    };
    let bad = [
        (
            leaf("up.img", "../../bob/secret.img"),
            "outside tenant alice's image roots",
        ),
        (
            leaf(
                "abs.img",
                &h.root("bob").join("secret.img").display().to_string(),
            ),
            "outside tenant alice's image roots",
        ),
        (
            leaf("deep.img", "../../../../../../../../etc/shadow"),
            "climbs above /",
        ),
        (
            leaf("link.img", "../base-link.img"),
            "is a symlink or passes through one: refused (images and parents must be \
             regular files, symlinks are refused",
        ),
    ];
    for (spec, why) in &bad {
        let err = h.fails(&ALICE, &["create", "-a", spec]);
        assert!(
            err.contains("parent refused") && err.contains(why),
            "{spec}: {err}"
        );
        let parent_lines: Vec<_> = h
            .audit_lines()
            .into_iter()
            .filter(|l| l["event"] == "parent_open")
            .collect();
        let l = parent_lines.last().expect("parent decision audited");
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["tenant"], "alice");
        assert!(l["request"]["locator"]["path"].is_string());
    }
    assert_eq!(h.ok(&ROOT, &["list"]), "", "refused opens leave nothing");
    // Inside the roots: opened (read-only), audited as allowed, in stats.
    let ok = leaf("good.img", "../base.img");
    h.ok(&ALICE, &["create", "-a", &ok]);
    let allow = h
        .audit_lines()
        .into_iter()
        .rfind(|l| l["event"] == "parent_open")
        .unwrap();
    assert_eq!(allow["decision"], "allow", "{allow}");
    assert!(allow["outcome"].as_str().unwrap().contains("read-only"));
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", "0"])).unwrap();
    assert_eq!(
        stats["images"][1]["name"],
        a.join("base.img").to_str().unwrap()
    );
    // The parent is now read-only-claimed: a writable open of it elsewhere is refused.
    let base = format!("aio:{}", a.join("base.img").display());
    assert!(h
        .fails(&ALICE, &["create", "-a", &base])
        .contains("already open"));
    h.ok(&ALICE, &["create", "-a", &base, "-R"]);
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    h.ok(&ALICE, &["destroy", "-m", "1"]);
}

/// A real VHD differencing chain: the worker parses the child's parent
/// locators and asks; the broker opens parents only inside the tenant's
/// roots.
#[test]
fn escapes_vhd_parent_outside_roots_is_refused_inside_is_served() {
    let h = Harness::start(Options::default());
    let a = h.root("alice");
    std::fs::create_dir(a.join("vms")).unwrap();
    let bob_base = h.vhd_image("bob", "base.vhd", 8);
    let stolen = a.join("vms/stolen.vhd");
    h.vhd_snapshot(&stolen, &bob_base);
    let err = h.fails(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", stolen.display())],
    );
    assert!(err.contains("outside tenant alice's image roots"), "{err}");
    // Decisions taken before opening (outcome "pending") are followed by
    // the line that says what came of them.
    let refused: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "parent_open" && l["outcome"] != "pending")
        .collect();
    assert!(
        !refused.is_empty() && refused.iter().all(|l| l["decision"] == "deny"),
        "{refused:?}"
    );
    assert_eq!(h.ok(&ROOT, &["list"]), "");

    let base = h.vhd_image("alice", "base.vhd", 8);
    let child = a.join("vms/child.vhd");
    h.vhd_snapshot(&child, &base);
    h.ok(
        &ALICE,
        &["create", "-a", &format!("vhd:{}", child.display())],
    );
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", "0"])).unwrap();
    assert_eq!(stats["images"].as_array().unwrap().len(), 2, "{stats}");
    assert_eq!(stats["images"][1]["name"], base.to_str().unwrap());
    let allowed = h
        .audit_lines()
        .into_iter()
        .rfind(|l| l["event"] == "parent_open")
        .unwrap();
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    // The parent is shared read-only: a writable open of it is refused.
    assert!(h
        .fails(
            &ALICE,
            &["create", "-a", &format!("vhd:{}", base.display())]
        )
        .contains("already open"));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}
