//! XAPI's storage manager on tapjail: `xapi/sm_harness.py` makes the
//! tap-ctl calls SM's `drivers/blktap2.py` makes, in SM's orders, and
//! parses the answers by SM's rules, against a real tap-broker with FUSE +
//! loop devices. Needs root, python3, /dev/fuse and loop devices.

use std::process::Command;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, have, is_root, require};

#[test]
fn sm_harness_attach_detach_pause_and_error_paths_parse_and_back_out_as_sm_expects() {
    if !require(is_root(), "root (FUSE mounts, loop devices)")
        || !require(have("python3"), "python3 (runs SM's call sequences)")
        || !require(
            have("qemu-nbd"),
            "qemu-nbd (the storage migration's destination)",
        )
    {
        return;
    }
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let granted = socket_dir();
    let denied = socket_dir();
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE],
        tenant_lines: vec![
            (
                "ops",
                format!("mirror = {{ unix_dirs = [{:?}] }}", granted.path()),
            ),
            ("ops", "read_cache_root = \"{root}/cache\"".into()),
        ],
        ..Options::default()
    });
    let mirror = Nbd::start(granted.path(), 16 << 20);
    let outside = Nbd::start(denied.path(), 16 << 20);
    // Another tenant's read-only gold master: SM (as root) must not be
    // able to base a clone on it with -e.
    let theirs = h.vhd_image("alice", "gold.vhd", 8);
    let dev = h.ok(
        &ALICE,
        &["create", "-R", "-a", &format!("vhd:{}", theirs.display())],
    );
    let foreign = dev
        .trim()
        .rsplit_once("tapdev")
        .map(|(_, n)| n.to_string())
        .expect("create printed a tapdevN path");

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("xapi/sm_harness.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("SM_TAPCTL", bin("tap-ctl"))
        .env("TAPJAIL_SOCKET", &h.socket)
        .env("SM_DEVDIR", &h.devices)
        .env("SM_IMAGES", h.root("ops"))
        .env("SM_FOREIGN_MINOR", &foreign)
        .env("SM_MIRROR", &mirror.sock)
        .env("SM_MIRROR_DENIED", &outside.sock)
        .output()
        .expect("run python3");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "SM harness: {}\n{said}\n--- broker log ---\n{}",
        out.status,
        h.broker_log()
    );
    assert!(said.contains("all calls behaved as SM expects"), "{said}");

    // Every decision is on record: -r carried out, -r outside the cache
    // root denied by its rule, the cross-tenant -e as a denial by its
    // rule; and no key byte anywhere in the log.
    let lines = h.audit_lines();
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("-r: served as a read cache"))),
        "no audited -r open"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["rule"] == "read-cache-root" && l["decision"] == "deny"),
        "the -r outside the read_cache_root is not on record"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["rule"] == "foreign-parent" && l["decision"] == "deny"),
        "the cross-tenant -e is not on record"
    );
    // -C on open and -c on unpause are carried out, and on record.
    for log in ["cbt.cbtlog", "clone1.cbtlog"] {
        assert!(
            lines.iter().any(|l| l["request"].to_string().contains(log)
                && l["outcome"]
                    .as_str()
                    .is_some_and(|o| !o.contains("not supported"))),
            "{log} is not on record"
        );
    }
    // The harness's -E key (bytes (i * 13 + 5) % 256): not in the audit
    // log or the broker's (and its workers') log, raw or as hex.
    let key: Vec<u8> = (0..64u32).map(|i| ((i * 13 + 5) % 256) as u8).collect();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let raw_audit = std::fs::read(&h.audit).unwrap();
    let broker_log = h.broker_log();
    for (what, hay) in [
        ("audit log", &raw_audit),
        ("broker log", &broker_log.clone().into_bytes()),
    ] {
        assert!(
            !hay.windows(16).any(|w| w == &key[..16]),
            "key bytes in the {what}"
        );
        let t = String::from_utf8_lossy(hay).to_lowercase();
        assert!(!t.contains(&hex[..32]), "key hex in the {what}");
    }
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("-E: 64-byte key"))),
        "the -E open is not on record"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["rule"] == "mirror-target" && l["decision"] == "deny"),
        "the refused secondary is not on record"
    );
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("switched to the secondary"))),
        "the switch is not on record"
    );
    // SM's IntelliCache leaf calls: -r on the leaf read as leaf mode, the
    // file secondary opened (and audited) in both modes.
    assert!(
        lines.iter().any(|l| l["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("leaf-mode lcache") && o.contains("-2 vhd:"))),
        "the normal-mode leaf call is not on record"
    );
    for vdi in ["vm.vhd", "vm-scratch.vhd"] {
        assert!(
            lines.iter().any(|l| l["rule"] == "mirror-file"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(vdi) && r.contains("opened"))),
            "the secondary {vdi} is not on record as opened"
        );
    }
    h.ok(&ALICE, &["destroy", "-m", &foreign]);
}

/// qemu-nbd serving a fresh raw file on a unix socket; killed on drop.
struct Nbd {
    child: std::process::Child,
    sock: std::path::PathBuf,
}

impl Nbd {
    fn start(dir: &std::path::Path, size: u64) -> Nbd {
        let file = dir.join("dest.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("destination image");
        let sock = dir.join("dest.sock");
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-e", "4", "-k"])
            .arg(&sock)
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        assert!(
            eventually(std::time::Duration::from_secs(20), || sock.exists()),
            "qemu-nbd made no socket"
        );
        Nbd { child, sock }
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("tapjail-sm-mirror-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    d
}
