//! The seed's tap-ctl session (xen wiki "Mounting a .vhd disk image using
//! blktap/tapdisk"), word for word, on a terminal and off one.

use crate::*;

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn seed_session_on_a_terminal_matches_the_wiki() {
    let h = Harness::start(Options::default());
    let img = h.vhd_image("ops", "smalltest.vhd", 8);
    let img = img.to_str().unwrap();
    let tty = |args: &[&str]| {
        let (ok, out) = h.ctl_tty(&ROOT, args);
        assert!(ok, "tap-ctl {args:?}: {out}\n{}", h.broker_log());
        out
    };

    // (nothing allocated or running)
    assert_eq!(tty(&["list"]), "");
    // $ sudo tap-ctl allocate  -> the device path, minor 0
    let dev = tty(&["allocate"]);
    assert_eq!(dev, format!("{}/tapdev0\n", h.devices.display()));
    assert_eq!(tty(&["list"]), "       -    0    -          - -\n");
    // $ sudo tap-ctl spawn
    let spawned = tty(&["spawn"]);
    let pid: u32 = spawned
        .strip_prefix("tapdisk spawned with pid ")
        .and_then(|s| s.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("spawn printed {spawned:?}"));
    assert_eq!(
        lines(&tty(&["list"])),
        vec![
            format!("{pid:>8}    -    -          - -"),
            "       -    0    -          - -".to_string()
        ]
    );
    // $ sudo tap-ctl attach -m 0 -p PID
    assert_eq!(tty(&["attach", "-m", "0", "-p", &pid.to_string()]), "");
    assert_eq!(tty(&["list"]), format!("{pid:>8}    0    0          - -\n"));
    // $ sudo tap-ctl open -m 0 -p PID -a TYPE:PATH
    assert_eq!(
        tty(&[
            "open",
            "-m",
            "0",
            "-p",
            &pid.to_string(),
            "-a",
            &format!("vhd:{img}")
        ]),
        ""
    );
    assert_eq!(
        tty(&["list"]),
        format!("{pid:>8}    0    0        vhd {img}\n")
    );
    // $ sudo tap-ctl stats -m 0 -p PID
    let stats: serde_json::Value =
        serde_json::from_str(&tty(&["stats", "-m", "0", "-p", &pid.to_string()])).unwrap();
    assert_eq!(stats["name"], format!("vhd:{img}"));
    assert!(stats["secs"].is_array());
    assert_eq!(stats["images"][0]["name"], img);
    assert_eq!(stats["images"][0]["driver"]["name"], "vhd");
    assert_eq!(stats["images"][0]["driver"]["type"], 4);
    assert!(stats["images"][0]["hits"].is_array() && stats["images"][0]["fail"].is_array());
    assert_eq!(stats["tap"]["minor"], 0);
    assert_eq!(stats["tap"]["frontend"], "nbd");
    assert!(stats["reqs_outstanding"].is_u64());
    assert!(stats["latency"].is_object());
    // The NBD "device" is served.
    let link = h.devices.join("tapdev0");
    let sock = std::fs::read_link(&link).expect("tapdev0 symlink");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    // $ sudo tap-ctl close -m 0 -p PID
    assert_eq!(tty(&["close", "-m", "0", "-p", &pid.to_string()]), "");
    assert!(!link.exists() && !sock.exists());
    // $ sudo tap-ctl detach -m 0 -p PID  (this also ends that tapdisk)
    assert_eq!(tty(&["detach", "-m", "0", "-p", &pid.to_string()]), "");
    assert!(eventually(std::time::Duration::from_secs(5), || !alive(
        pid
    )));
    assert_eq!(tty(&["list"]), "       -    0    -          - -\n");
    // $ sudo tap-ctl free -m 0
    assert_eq!(tty(&["free", "-m", "0"]), "");
    assert_eq!(tty(&["list"]), "");
}

#[test]
fn seed_session_off_a_terminal_prints_blktap_dict_rows() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("ops", "disk.img", 1 << 20);
    let img = img.to_str().unwrap();
    assert_eq!(
        h.ok(&ROOT, &["allocate"]).trim(),
        h.devices.join("tapdev0").to_str().unwrap()
    );
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    assert!(
        pid.parse::<u32>().is_ok(),
        "non-tty spawn prints the bare pid: {pid:?}"
    );
    assert_eq!(h.ok(&ROOT, &["list"]), format!("pid={pid}\nminor=0\n"));
    h.ok(&ROOT, &["attach", "-m", "0", "-p", &pid]);
    h.ok(
        &ROOT,
        &[
            "open",
            "-m",
            "0",
            "-p",
            &pid,
            "-a",
            &format!("aio:{img}"),
            "-R",
        ],
    );
    assert_eq!(
        h.ok(&ROOT, &["list"]),
        format!("pid={pid} minor=0 state=0 args=aio:{img}\n")
    );
    h.ok(&ROOT, &["pause", "-m", "0", "-p", &pid]);
    assert_eq!(
        h.ok(&ROOT, &["list", "-m", "0"]),
        format!("pid={pid} minor=0 state=0x20 args=aio:{img}\n")
    );
    h.ok(&ROOT, &["unpause", "-m", "0", "-p", &pid]);
    let json: serde_json::Value = serde_json::from_str(&h.ok(&ROOT, &["list", "--json"])).unwrap();
    assert_eq!(json[0]["pid"].to_string(), pid);
    assert_eq!(json[0]["read_only"], true);
    assert_eq!(json[0]["frontend"], "nbd");
    assert_eq!(json[0]["type"], "aio");
    h.ok(&ROOT, &["destroy", "-m", "0", "-p", &pid]);
    assert_eq!(h.ok(&ROOT, &["list"]), "");
}

#[test]
fn create_and_destroy_in_one_step_print_the_device() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "a.img", 1 << 20);
    let dev = h.ok(&ALICE, &["create", "-a", &format!("aio:{}", img.display())]);
    assert_eq!(dev.trim(), h.devices.join("tapdev0").to_str().unwrap());
    let list = h.ok(&ALICE, &["list"]);
    assert!(
        list.starts_with("pid=") && list.contains("minor=0 state=0 args=aio:"),
        "{list}"
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    assert_eq!(h.ok(&ALICE, &["list"]), "");
}

#[test]
fn misuse_gets_clear_errors_and_changes_nothing() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("ops", "m.img", 1 << 20);
    let spec = format!("aio:{}", img.display());
    assert!(h
        .fails(&ROOT, &["free", "-m", "3"])
        .contains("minor 3 is not allocated"));
    h.ok(&ROOT, &["allocate"]);
    let pid = h.ok(&ROOT, &["spawn"]).trim().to_string();
    assert!(h
        .fails(&ROOT, &["open", "-m", "0", "-a", &spec])
        .contains("no tapdisk attached"));
    assert!(h
        .fails(&ROOT, &["attach", "-m", "0", "-p", "1"])
        .contains("no tapdisk with pid 1"));
    h.ok(&ROOT, &["attach", "-m", "0", "-p", &pid]);
    assert!(h
        .fails(&ROOT, &["attach", "-m", "0", "-p", &pid])
        .contains("already attached"));
    assert!(h
        .fails(&ROOT, &["open", "-m", "0", "-p", "1", "-a", &spec])
        .contains(&format!("attached to tapdisk {pid}, not 1")));
    h.ok(&ROOT, &["open", "-m", "0", "-p", &pid, "-a", &spec]);
    assert!(h
        .fails(&ROOT, &["open", "-m", "0", "-p", &pid, "-a", &spec])
        .contains("already has aio:"));
    assert!(h
        .fails(&ROOT, &["free", "-m", "0"])
        .contains("detach it first"));
    assert!(h
        .fails(&ROOT, &["detach", "-m", "0", "-p", &pid])
        .contains("close it first"));
    assert!(h
        .fails(&ROOT, &["unpause", "-m", "0"])
        .contains("not paused"));
    assert!(h
        .fails(&ROOT, &["open", "-m", "0", "-a", "qcow2:/x"])
        .contains("unknown image type"));
    assert!(h
        .fails(&ROOT, &["free", "-m", "16384"])
        .contains("out of range"));
    // Nothing changed.
    assert_eq!(
        h.ok(&ROOT, &["list"]),
        format!("pid={pid} minor=0 state=0 args={spec}\n")
    );
    h.ok(&ROOT, &["destroy", "-m", "0"]);
}

/// Data goes through the broker-made NBD socket into the VHD and survives
/// destroy + create; the image checks clean afterwards.
#[test]
fn seed_vhd_data_round_trips_through_the_served_device() {
    let h = Harness::start(Options::default());
    let img = h.vhd_image("alice", "data.vhd", 16);
    let spec = format!("vhd:{}", img.display());
    let qemu_io = |sock: &std::path::Path, cmds: &[&str]| {
        let mut c = std::process::Command::new("qemu-io");
        if cmds.iter().all(|c| c.starts_with("read")) {
            c.arg("-r");
        }
        c.args([
            "-f",
            "raw",
            &format!("nbd+unix:///tapdev0?socket={}", sock.display()),
        ]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.output().expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("fail"),
            "{cmds:?}: {text}"
        );
        text
    };
    h.ok(&ALICE, &["create", "-a", &spec]);
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    qemu_io(
        &sock,
        &[
            "write -P 0xab 1M 64k",
            "read -P 0xab 1M 64k",
            "read -P 0 0 64k",
        ],
    );
    let stats: serde_json::Value =
        serde_json::from_str(&h.ok(&ALICE, &["stats", "-m", "0"])).unwrap();
    assert!(stats["secs"][1].as_u64().unwrap() >= 128, "{stats}");
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    let out = std::process::Command::new(bin("tap-ctl"))
        .args(["vhd", "check", "-n"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    h.ok(&ALICE, &["create", "-a", &spec, "-R"]);
    let sock = std::fs::read_link(h.devices.join("tapdev0")).unwrap();
    qemu_io(&sock, &["read -P 0xab 1M 64k"]);
    // A read-only disk refuses writes.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///tapdev0?socket={}", sock.display()),
        ])
        .args(["-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("ermission") || text.contains("failed"),
        "{text}"
    );
    h.ok(&ALICE, &["destroy", "-m", "0"]);
}

/// pause closes the image so it can be replaced offline; unpause -a
/// reopens at a new path of the same size and refuses another size.
#[test]
fn seed_pause_unpause_switches_images_of_the_same_size_only() {
    let h = Harness::start(Options::default());
    let a = h.vhd_image("alice", "a.vhd", 8);
    let same = h.root("alice").join("copy.vhd");
    std::fs::copy(&a, &same).unwrap();
    h.own(&same);
    let bigger = h.vhd_image("alice", "big.vhd", 16);
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", a.display())]);
    assert!(h
        .fails(&ALICE, &["unpause", "-m", "0"])
        .contains("not paused"));
    h.ok(&ALICE, &["pause", "-m", "0"]);
    assert!(h
        .fails(&ALICE, &["pause", "-m", "0"])
        .contains("already paused"));
    let err = h.fails(
        &ALICE,
        &[
            "unpause",
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", bigger.display()),
        ],
    );
    assert!(err.contains("size"), "{err}");
    assert!(
        h.ok(&ALICE, &["list"]).contains("state=0x20"),
        "still paused after a refused unpause"
    );
    h.ok(
        &ALICE,
        &[
            "unpause",
            "-m",
            "0",
            "-a",
            &format!("vhd:{}", same.display()),
        ],
    );
    let list = h.ok(&ALICE, &["list"]);
    assert!(
        list.ends_with(&format!("state=0 args=vhd:{}\n", same.display())),
        "{list}"
    );
    // The old file is free again; the new one is held.
    h.ok(&ALICE, &["create", "-a", &format!("vhd:{}", a.display())]);
    assert!(h
        .fails(
            &ALICE,
            &["create", "-a", &format!("vhd:{}", same.display())]
        )
        .contains("already open"));
    h.ok(&ALICE, &["destroy", "-m", "0"]);
    h.ok(&ALICE, &["destroy", "-m", "1"]);
}
