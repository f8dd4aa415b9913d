//! The seed's tap-ctl session (xen wiki "Mounting a .vhd disk image using
//! blktap/tapdisk"), word for word, on a terminal and off one.

use crate::*;

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn seed_session_on_a_terminal_matches_the_wiki() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("ops", "smalltest.img", 8 << 20);
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
            &format!("aio:{img}")
        ]),
        ""
    );
    assert_eq!(
        tty(&["list"]),
        format!("{pid:>8}    0    0        aio {img}\n")
    );
    // $ sudo tap-ctl stats -m 0 -p PID
    let stats: serde_json::Value =
        serde_json::from_str(&tty(&["stats", "-m", "0", "-p", &pid.to_string()])).unwrap();
    assert_eq!(stats["name"], format!("aio:{img}"));
    assert!(stats["secs"].is_array());
    assert_eq!(stats["images"][0]["name"], img);
    assert_eq!(stats["images"][0]["driver"]["name"], "aio");
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
