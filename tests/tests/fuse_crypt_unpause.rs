//! `unpause -E` end to end (FUSE + loop, a real confined tapdisk): a
//! paused encrypted disk reopens on another image with another key read
//! from stdin. A wrong key leaves the disk paused with the key it had (a
//! plain `unpause` still reads the old image); the right one is kept, by
//! the worker and by the broker, so a respawned worker reopens with it.
//! The keys appear in no log, audit line or output. Needs root, /dev/fuse
//! and loop devices.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use tapjail_tests::*;
use tapjail_testsupport::fuse_loop_turn;

const AT: u64 = 1 << 20;

fn pattern(salt: u64) -> Vec<u8> {
    (0..64u64)
        .flat_map(|s| (s ^ salt).to_le_bytes().repeat(64))
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `tap-ctl vhd key -s -k - -n IMG` with `key` on stdin.
fn set_key(img: &Path, key: &[u8]) {
    let mut set = Command::new(bin("tap-ctl"))
        .args(["vhd", "key", "-s", "-k", "-", "-n"])
        .arg(img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), key).unwrap();
    assert!(set.wait().unwrap().success(), "vhd key -s");
}

/// What the device holds at `AT`, past the kernel's page cache.
fn read_dev(dev: &Path) -> Vec<u8> {
    let flushed = Command::new("blockdev")
        .arg("--flushbufs")
        .arg(dev)
        .status()
        .unwrap();
    assert!(flushed.success(), "blockdev --flushbufs");
    let f = OpenOptions::new().read(true).open(dev).unwrap();
    let mut back = vec![0u8; pattern(0).len()];
    f.read_exact_at(&mut back, AT).unwrap();
    back
}

fn write_dev(dev: &Path, data: &[u8]) {
    let f = OpenOptions::new().read(true).write(true).open(dev).unwrap();
    f.write_all_at(data, AT).unwrap();
    f.sync_all().unwrap();
}

fn row(h: &Harness) -> String {
    h.ok(&ROOT, &["list", "-m", "0"])
}

#[test]
fn fuse_crypt_unpause_e_reopens_with_a_new_key_kept_only_on_success_and_never_shown() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        respawn: true,
        tenants: vec![ROOT],
        ..Options::default()
    });
    let old = h.vhd_image(ROOT.name, "old.vhd", 8);
    let new = h.vhd_image(ROOT.name, "new.vhd", 8);
    let k_old: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(3))
        .collect();
    let k_new: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(53).wrapping_add(17))
        .collect();
    set_key(&old, &k_old);
    set_key(&new, &k_new);
    let (a, b) = (pattern(0xa1), pattern(0xb2));
    let mut outputs = Vec::new();
    let mut run = |args: &[&str], key: Option<&[u8]>| -> Output {
        let o = match key {
            Some(k) => h.ctl_input(&ROOT, args, k),
            None => h.ctl(&ROOT, args),
        };
        outputs.push(o.clone());
        o
    };
    let ok = |o: &Output, what: &str| assert!(o.status.success(), "{what}: {}", text(o));

    let dev = std::path::PathBuf::from(h.ok(&ROOT, &["allocate"]).trim());
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    ok(&run(&["attach", "-p", &pid, "-m", "0"], None), "attach");
    let spec = |p: &Path| format!("vhd:{}", p.display());
    // The new image gets its data under its own key first.
    ok(
        &run(&["open", "-m", "0", "-a", &spec(&new), "-E"], Some(&k_new)),
        "open -E new",
    );
    write_dev(&dev, &b);
    ok(&run(&["close", "-m", "0"], None), "close");
    ok(
        &run(&["open", "-m", "0", "-a", &spec(&old), "-E"], Some(&k_old)),
        "open -E old",
    );
    write_dev(&dev, &a);
    ok(&run(&["pause", "-m", "0"], None), "pause");

    // The old key cannot open the new image: refused, still paused.
    let o = run(
        &["unpause", "-m", "0", "-a", &spec(&new), "-E"],
        Some(&k_old),
    );
    assert!(!o.status.success(), "unpause -E with a wrong key worked");
    assert!(text(&o).contains("does not match"), "{}", text(&o));
    assert!(row(&h).contains("state=0x20"), "not paused: {}", row(&h));
    // The failed key was not kept: a plain unpause reopens the old image
    // with the old key.
    ok(&run(&["unpause", "-m", "0"], None), "plain unpause");
    assert!(read_dev(&dev) == a, "the old image reads otherwise");
    ok(&run(&["pause", "-m", "0"], None), "pause again");

    // The new key on stdin: the disk serves the new image.
    ok(
        &run(
            &["unpause", "-m", "0", "-a", &spec(&new), "-E"],
            Some(&k_new),
        ),
        "unpause -E new",
    );
    assert!(row(&h).contains(&format!("state=0 args=vhd:{}", new.display())));
    assert!(read_dev(&dev) == b, "the new image reads otherwise");

    // The broker kept the new key: a respawned worker reopens with it.
    let first = pid_field(&row(&h)).unwrap();
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    assert!(
        eventually(std::time::Duration::from_secs(30), || {
            let r = row(&h);
            pid_field(&r).is_some_and(|p| p != first) && r.contains("state=0 ")
        }),
        "no respawn with the new key: {}\n{}",
        h.ok(&ROOT, &["list"]),
        h.broker_log()
    );
    assert!(read_dev(&dev) == b, "the respawned worker reads otherwise");
    ok(&run(&["close", "-m", "0"], None), "close");

    // Neither key anywhere: audit log, broker (and workers') log, output.
    let mut hay: Vec<Vec<u8>> = outputs
        .iter()
        .flat_map(|o| [o.stdout.clone(), o.stderr.clone()])
        .collect();
    hay.push(h.broker_log().into_bytes());
    hay.push(fs::read(&h.audit).expect("the audit log"));
    for key in [&k_old, &k_new] {
        let lower = hex(key);
        for (i, t) in hay.iter().enumerate() {
            assert!(!contains(t, &key[..16]), "key bytes in output #{i}");
            let t = String::from_utf8_lossy(t).to_lowercase();
            assert!(!t.contains(&lower[..32]), "key hex in output #{i}");
        }
    }
    // Both unpause -E requests are on record with the key's size only.
    let unpauses: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|l| l["request"].to_string().contains("Unpause"))
        .filter(|l| l["outcome"].as_str().is_some_and(|o| o.contains("-E:")))
        .collect();
    assert!(
        unpauses
            .iter()
            .any(|l| l["outcome"].as_str().unwrap().contains("-E: 64-byte key")),
        "the unpause -E is not on record: {unpauses:?}"
    );
}
