//! `--json` of the lifecycle commands against a real broker and FUSE +
//! loop devices: each document parses and carries what the plain output
//! says; `stats` carries blktap's `kicks`, which move with real I/O; and
//! the errors a user can cause name the minor or file and a next step.
//! Needs root, /dev/fuse and loop devices.

use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use tapjail_tests::*;
use tapjail_testsupport::{fuse_loop_turn, Aligned};

fn json(h: &Harness, t: &TenantSpec, args: &[&str]) -> Value {
    let out = h.ok(t, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"))
}

fn direct_io(dev: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open the device O_DIRECT");
    let mut buf = Aligned::new(64 << 10);
    buf.buf().fill(0x5a);
    f.write_all_at(buf.buf(), 0).expect("write");
    f.sync_all().expect("fsync");
    f.read_exact_at(buf.buf(), 0).expect("read");
}

fn pair(v: &Value) -> [u64; 2] {
    [v[0].as_u64().unwrap(), v[1].as_u64().unwrap()]
}

#[test]
fn json_lifecycle_documents_match_plain_output_and_stats_count_kicks() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE],
        ..Options::default()
    });
    let img = h.raw_image("alice", "a.img", 4 << 20);
    let spec = format!("aio:{}", img.display());
    let c = json(&h, &ALICE, &["create", "-a", &spec, "--json"]);
    let minor = c["minor"].as_u64().unwrap().to_string();
    let pid = c["pid"].as_u64().unwrap();
    let dev = c["device"].as_str().unwrap().to_string();
    assert!(dev.ends_with(&format!("tapdev{minor}")), "{c}");
    assert!(Path::new(&dev).exists(), "{c}");

    // list: the dict rows blktap prints off a terminal, and the JSON rows.
    let plain = h.ok(&ALICE, &["list"]);
    let rows = json(&h, &ALICE, &["list", "--json"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), plain.lines().count(), "{plain}\n{rows:?}");
    let row = &rows[0];
    assert_eq!(row["pid"], pid);
    assert_eq!(row["minor"].as_u64().unwrap().to_string(), minor);
    assert_eq!(row["type"], "aio");
    assert_eq!(row["file"], img.to_str().unwrap());
    assert_eq!(row["frontend"], "fuse");
    let state = row["state"].as_u64().unwrap();
    let dict = format!(
        "pid={pid} minor={minor} state={} args=aio:{}",
        if state == 0 {
            "0".to_string()
        } else {
            format!("{state:#x}")
        },
        img.display()
    );
    assert!(plain.lines().any(|l| l == dict), "{plain}\nwant {dict}");

    // stats: the same document with or without --json; kicks move with I/O.
    let before = json(&h, &ALICE, &["stats", "-m", &minor, "--json"]);
    direct_io(Path::new(&dev));
    let after = json(&h, &ALICE, &["stats", "-m", &minor]);
    assert_eq!(after["tap"]["minor"].as_u64().unwrap().to_string(), minor);
    let (k0, k1) = (pair(&before["tap"]["kicks"]), pair(&after["tap"]["kicks"]));
    let (r0, r1) = (pair(&before["tap"]["reqs"]), pair(&after["tap"]["reqs"]));
    assert!(r1[0] >= r0[0] + 2, "a write and a read: {after}");
    assert!(k1[0] > k0[0] && k1[1] > k0[1], "kicks {k0:?} -> {k1:?}");
    // Every request came with a wakeup and left with a reply.
    assert!(k1[0] - k0[0] >= r1[0] - r0[0], "{before}\n{after}");
    let keys: Vec<&str> = after
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in ["name", "secs", "images", "tap", "reqs_outstanding"] {
        assert!(keys.contains(&k), "{k} missing: {after}");
    }

    // metrics --json: the same figures as `list --json` and `stats`.
    let m = json(&h, &ALICE, &["metrics", "--json"]);
    let m = m.as_array().unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["disk"]["minor"].to_string(), minor);
    assert_eq!(m[0]["disk"]["file"], img.to_str().unwrap());
    assert_eq!(m[0]["stats"]["name"], after["name"]);
    assert!(pair(&m[0]["stats"]["tap"]["kicks"])[0] >= k1[0]);

    // major
    let major = h.ok(&ALICE, &["major"]).trim().parse::<u64>().unwrap();
    assert_eq!(json(&h, &ALICE, &["major", "--json"])["major"], major);

    // throttle (an admin's): the limits in force, plain and JSON.
    let plain = h.ok(&ROOT, &["throttle", "-m", &minor, "--write-bps", "10M:1M"]);
    assert!(plain.contains("write_bps=10485760:1048576"), "{plain}");
    let t = json(
        &h,
        &ROOT,
        &["throttle", "-m", &minor, "--read-iops", "500", "--json"],
    );
    assert_eq!(t["write_bps"]["per_sec"], 10 << 20, "{t}");
    assert_eq!(t["write_bps"]["burst"], 1 << 20, "{t}");
    assert_eq!(t["read_iops"]["per_sec"], 500, "{t}");
    assert!(t["write_iops"].is_null(), "{t}");

    h.ok(&ALICE, &["destroy", "-m", &minor]);
    let a = json(&h, &ALICE, &["allocate", "--json"]);
    let m = a["minor"].as_u64().unwrap().to_string();
    assert!(
        a["device"]
            .as_str()
            .unwrap()
            .ends_with(&format!("tapdev{m}")),
        "{a}"
    );
    h.ok(&ALICE, &["free", "-m", &m]);
}

/// A user-caused error of a lifecycle command: what the message must name
/// and words of the next step it must give.
struct Case<'a> {
    who: &'a TenantSpec,
    args: Vec<&'a str>,
    names: &'a str,
    next: &'a str,
}

#[test]
fn lifecycle_user_errors_name_the_minor_or_file_and_the_next_step() {
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE, BOB],
        ..Options::default()
    });
    let img = h.raw_image("alice", "a.img", 4 << 20);
    let spec = format!("aio:{}", img.display());
    let minor = json(&h, &ALICE, &["create", "-a", &spec, "--json"])["minor"].to_string();
    let missing = format!("{}/missing.img", img.parent().unwrap().display());
    let missing_spec = format!("aio:{missing}");
    let raw = h.raw_image("alice", "b.img", 1 << 20);
    let not_vhd = format!("vhd:{}", raw.display());
    let outside = "aio:/etc/passwd".to_string();
    let cases = [
        Case {
            who: &ALICE,
            args: vec!["stats", "-m", "77"],
            names: "77",
            next: "tap-ctl list",
        },
        Case {
            who: &BOB,
            args: vec!["stats", "-m", &minor],
            names: &minor,
            next: "tap-ctl list",
        },
        Case {
            who: &BOB,
            args: vec!["destroy", "-m", &minor],
            names: &minor,
            next: "tap-ctl list",
        },
        Case {
            who: &ALICE,
            args: vec!["create", "-a", &missing_spec],
            names: &missing,
            next: "check the path",
        },
        Case {
            who: &ALICE,
            args: vec!["create", "-a", &outside],
            names: "/etc/passwd",
            next: "image_roots",
        },
        Case {
            who: &ALICE,
            args: vec!["create", "-a", &not_vhd],
            names: raw.to_str().unwrap(),
            next: "aio:",
        },
        Case {
            who: &ALICE,
            args: vec!["free", "-m", &minor],
            names: &minor,
            next: "destroy",
        },
        Case {
            who: &ALICE,
            args: vec!["throttle", "-m", &minor, "--write-bps", "fast"],
            names: "--write-bps fast",
            next: "like 500",
        },
    ];
    let mut bad = Vec::new();
    for c in &cases {
        let o = h.ctl(c.who, &c.args);
        let err = String::from_utf8_lossy(&o.stderr);
        let fine = !o.status.success()
            && o.status.code() != Some(101)
            && err.lines().count() == 1
            && err.contains(c.names)
            && err.contains(c.next);
        if !fine {
            bad.push(format!("{} {:?}: {err}", c.who.name, c.args));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    h.ok(&ALICE, &["destroy", "-m", &minor]);
}

/// One HTTP exchange with the exporter: `request` sent as is, the whole
/// answer read until the server closes.
fn http(addr: &str, request: &[u8]) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the exporter");
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_listen_answers_a_real_http_get_that_prometheus_client_parses() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use tapjail_testsupport::prometheus::{have_parser, parse};
    if !tapjail_testsupport::require(have_parser(), "python3-prometheus-client") {
        return;
    }
    let _turn = fuse_loop_turn().expect("the FUSE + loop test lock");
    let h = Harness::start(Options {
        frontend: "fuse",
        tenants: vec![ROOT, ALICE, BOB],
        ..Options::default()
    });
    let a = h.raw_image("alice", "a.img", 4 << 20);
    let b = h.raw_image("bob", "b.img", 4 << 20);
    h.ok(&ALICE, &["create", "-a", &format!("aio:{}", a.display())]);
    h.ok(&BOB, &["create", "-a", &format!("aio:{}", b.display())]);
    // The exporter runs as alice: it shows what alice may see.
    let mut child = std::process::Command::new(bin("tap-ctl"))
        .arg("--socket")
        .arg(&h.socket)
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .uid(ALICE.uid)
        .gid(ALICE.gid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("tap-ctl: serving metrics on http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();

    let get = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n";
    let (head, body) = http(&addr, get);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let fams = parse(&body).unwrap_or_else(|e| panic!("parser refused: {e}\n{body}"));
    let up = fams
        .iter()
        .find(|f| f.name == "tapjail_disk_up")
        .expect("tapjail_disk_up");
    assert_eq!(up.samples.len(), 1, "alice's disk only: {body}");
    assert_eq!(up.samples[0].label("tenant"), Some("alice"));
    assert!(!body.contains("b.img"), "bob's disk is not alice's to see");
    assert!(
        fams.iter().any(|f| f.name == "tapjail_disk_kicks"),
        "{body}"
    );

    // Anything but GET/HEAD /metrics is refused, and serving goes on.
    for (req, status) in [
        (b"POST /metrics HTTP/1.1\r\n\r\n".to_vec(), "405"),
        (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n".to_vec(), "404"),
        (b"GET /metrics\r\n\r\n".to_vec(), "400"),
        ([b'A'; 5000].to_vec(), "414"),
    ] {
        let (head, body) = http(&addr, &req);
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(!body.contains("tapjail_"), "{body}");
    }
    let (head, body) = http(&addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(body.is_empty());
    assert!(http(&addr, get).0.starts_with("HTTP/1.1 200 OK"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// On the NBD frontend a kick in is a socket read that was needed for the
/// next request header, a kick out one `sendmsg` of replies.
#[test]
fn stats_kicks_move_with_nbd_io() {
    let h = Harness::start(Options::default());
    let img = h.raw_image("alice", "n.img", 4 << 20);
    let c = json(
        &h,
        &ALICE,
        &["create", "-a", &format!("aio:{}", img.display()), "--json"],
    );
    let minor = c["minor"].to_string();
    let sock = std::fs::read_link(c["device"].as_str().unwrap()).unwrap();
    let tap = |h: &Harness| {
        let s = json(h, &ALICE, &["stats", "-m", &minor]);
        (pair(&s["tap"]["reqs"]), pair(&s["tap"]["kicks"]))
    };
    let (r0, k0) = tap(&h);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///tapdev{minor}?socket={}", sock.display()),
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "flush",
        ])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
    let (r1, k1) = tap(&h);
    let reqs = r1[0] - r0[0];
    let kicks = [k1[0] - k0[0], k1[1] - k0[1]];
    assert!(reqs >= 3, "write, read, flush: {reqs}");
    assert!(kicks[0] >= 1 && kicks[1] >= 1, "kicks {kicks:?}");
    // At most one read per request header, plus the one that saw the
    // client hang up (and its disconnect request).
    assert!(kicks[0] <= reqs + 2, "kicks {kicks:?} for {reqs} requests");
    h.ok(&ALICE, &["destroy", "-m", &minor]);
}
