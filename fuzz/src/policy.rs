//! `policy.toml` through the broker's parser and validator, as
//! `tap-broker --config` and `tap-ctl policy check` run it: UTF-8 text (the
//! broker refuses anything else before parsing), `Policy::parse`, its
//! `warnings` (with a made-up filesystem) and the worker-uid clash check
//! over id files (here the input text itself, so their parsers get
//! arbitrary lines too).
//!
//! Invariants, beyond "no panic": an error names at least one line within
//! the text; a policy that parses satisfies what validation promises (uid
//! ranges, no id or minor range claimed twice, normalized absolute paths,
//! no root "/"); and it renders back to TOML that parses to the same
//! policy (round trip).

use std::path::{Component, Path};
use tapjail_policy::config::MAX_MINOR;
use tapjail_policy::{FrontendChoice, Policy, RootProbe};

/// Whether `data` is a policy the broker would start with.
pub fn policy_toml(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let lines = text.lines().count().max(1) + 1;
    let warnings = Policy::warnings(text, &probe);
    for w in &warnings {
        assert!(
            w.line <= lines,
            "warning at line {} of {lines}: {w}",
            w.line
        );
    }
    let policy = match Policy::parse(text) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "an error without a diagnostic");
            for d in &e.diagnostics {
                assert!(d.line <= lines, "error at line {} of {lines}: {d}", d.line);
                assert!(!d.message.is_empty());
            }
            assert!(!e.render("fuzz.toml").is_empty());
            return false;
        }
    };
    validated(&policy);
    let read = |_: &Path| Ok::<String, String>(text.to_string());
    let _ = tapjail_policy::idmap::clashes(&policy.id_files, policy.worker_uids, &read);
    let again = render(&policy);
    match Policy::parse(&again) {
        Ok(back) => assert_eq!(back, policy, "round trip changed the policy:\n{again}"),
        Err(e) => panic!("a valid policy renders to an invalid one: {e}\n{again}"),
    }
    true
}

/// A filesystem made up from the path: deterministic, all three answers.
fn probe(p: &Path) -> RootProbe {
    match p.as_os_str().len() % 3 {
        0 => RootProbe::Dir,
        1 => RootProbe::Missing,
        _ => RootProbe::ThroughSymlink(p.join("real")),
    }
}

fn normalized(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !p.as_os_str().as_encoded_bytes().contains(&0)
        && (p == Path::new("/") || !p.as_os_str().as_encoded_bytes().ends_with(b"/"))
}

/// What validation promises of a policy that parsed.
fn validated(p: &Policy) {
    let (lo, hi) = p.worker_uids;
    assert!(
        lo >= 1 && lo <= hi && hi < u32::MAX,
        "worker_uids {lo}..={hi}"
    );
    let paths = [&p.socket, &p.audit_log, &p.state_dir, &p.device_dir];
    let ids = [
        &p.id_files.subuid,
        &p.id_files.subgid,
        &p.id_files.passwd,
        &p.id_files.group,
    ];
    for path in paths.into_iter().chain(ids).chain(p.tapdisk.as_ref()) {
        assert!(normalized(path), "{path:?} is not normalized");
    }
    assert!(!p.tenants.is_empty(), "a policy without tenants");
    let mut uids = Vec::new();
    let mut gids = Vec::new();
    let mut minors: Vec<(u16, u16)> = Vec::new();
    for (i, t) in p.tenants.iter().enumerate() {
        assert!(
            p.tenants[..i].iter().all(|o| o.name != t.name),
            "tenant {:?} twice",
            t.name
        );
        assert!(!t.uids.is_empty() || !t.gids.is_empty());
        for (what, list, seen) in [("uid", &t.uids, &mut uids), ("gid", &t.gids, &mut gids)] {
            for &v in list {
                assert!(v != u32::MAX, "{what} -1");
                assert!(!(lo..=hi).contains(&v), "{what} {v} inside worker_uids");
                assert!(!seen.contains(&v), "{what} {v} claimed twice");
                seen.push(v);
            }
        }
        for (k, r) in t.image_roots.iter().enumerate() {
            assert!(normalized(r) && r != Path::new("/"), "image root {r:?}");
            assert!(!t.image_roots[..k].contains(r), "image root {r:?} twice");
        }
        for s in &t.shared_roots {
            assert!(t.image_roots.contains(s), "shared root {s:?} not a root");
        }
        if let Some((a, b)) = t.minors {
            assert!(a <= b && b <= MAX_MINOR, "minors {a}..={b}");
            assert!(
                minors.iter().all(|(x, y)| b < *x || *y < a),
                "minors {a}..={b} overlap"
            );
            minors.push((a, b));
        }
        assert!(t.max_clients >= 1);
    }
}

fn s(p: &Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

fn int(v: impl Into<i64>) -> toml::Value {
    toml::Value::Integer(v.into())
}

/// An I/O limit table with every limit and its burst spelled out.
fn io_table(l: &tapjail_common::qos::IoLimits) -> toml::Value {
    let mut t = toml::Table::new();
    for k in tapjail_common::qos::Knob::ALL {
        if let Some(r) = l.get(k) {
            let v = |n: u64| int(i64::try_from(n).unwrap_or(i64::MAX));
            t.insert(k.name().to_string(), v(r.per_sec));
            t.insert(format!("{}_burst", k.name()), v(r.burst));
        }
    }
    toml::Value::Table(t)
}

/// `p` as a policy file (every key spelled out).
pub fn render(p: &Policy) -> String {
    let mut t = toml::Table::new();
    t.insert("socket".into(), s(&p.socket));
    t.insert("audit_log".into(), s(&p.audit_log));
    t.insert("state_dir".into(), s(&p.state_dir));
    t.insert("device_dir".into(), s(&p.device_dir));
    t.insert(
        "worker_uids".into(),
        toml::Value::Array(vec![int(p.worker_uids.0), int(p.worker_uids.1)]),
    );
    if let Some(d) = &p.tapdisk {
        t.insert("tapdisk".into(), s(d));
    }
    let frontend = match p.frontend {
        FrontendChoice::Auto => "auto",
        FrontendChoice::Ublk => "ublk",
        FrontendChoice::Fuse => "fuse",
        FrontendChoice::Nbd => "nbd",
    };
    t.insert("frontend".into(), toml::Value::String(frontend.into()));
    let mib = i64::try_from(p.worker_memlock >> 20).unwrap_or(i64::MAX);
    t.insert("worker_memlock_mib".into(), int(mib));
    t.insert("respawn".into(), toml::Value::Boolean(p.respawn));
    t.insert(
        "max_restarts_per_minute".into(),
        int(p.max_restarts_per_minute),
    );
    t.insert("worker_timeout_secs".into(), int(p.worker_timeout_secs));
    t.insert(
        "operation_timeout_secs".into(),
        int(p.operation_timeout_secs),
    );
    t.insert(
        "client_frame_timeout_secs".into(),
        int(p.client_frame_timeout_secs),
    );
    t.insert("max_clients".into(), int(p.max_clients));
    t.insert("audit_window_secs".into(), int(p.audit_window_secs));
    t.insert("subuid_file".into(), s(&p.id_files.subuid));
    t.insert("subgid_file".into(), s(&p.id_files.subgid));
    t.insert("passwd_file".into(), s(&p.id_files.passwd));
    t.insert("group_file".into(), s(&p.id_files.group));
    let tenants = p
        .tenants
        .iter()
        .map(|tn| {
            let mut m = toml::Table::new();
            m.insert("name".into(), toml::Value::String(tn.name.clone()));
            m.insert(
                "uids".into(),
                toml::Value::Array(tn.uids.iter().map(|&u| int(u)).collect()),
            );
            m.insert(
                "gids".into(),
                toml::Value::Array(tn.gids.iter().map(|&g| int(g)).collect()),
            );
            let roots = tn
                .image_roots
                .iter()
                .map(|r| {
                    if tn.shared_roots.contains(r) {
                        let mut rt = toml::Table::new();
                        rt.insert("path".into(), s(r));
                        rt.insert("shared_readonly".into(), toml::Value::Boolean(true));
                        toml::Value::Table(rt)
                    } else {
                        s(r)
                    }
                })
                .collect();
            m.insert("image_roots".into(), toml::Value::Array(roots));
            m.insert("writable".into(), toml::Value::Boolean(tn.writable));
            m.insert("max_disks".into(), int(tn.max_disks));
            if let Some((a, b)) = tn.minors {
                m.insert("minors".into(), toml::Value::Array(vec![int(a), int(b)]));
            }
            m.insert("admin".into(), toml::Value::Boolean(tn.admin));
            m.insert("page_cache".into(), toml::Value::Boolean(tn.page_cache));
            m.insert("share_parent".into(), toml::Value::Boolean(tn.share_parent));
            m.insert(
                "online_snapshot".into(),
                toml::Value::Boolean(tn.online_snapshot),
            );
            m.insert("disk_io".into(), io_table(&tn.disk_io));
            m.insert("tenant_io".into(), io_table(&tn.tenant_io));
            m.insert("max_clients".into(), int(tn.max_clients));
            toml::Value::Table(m)
        })
        .collect();
    t.insert("tenant".into(), toml::Value::Array(tenants));
    toml::to_string(&t).expect("a policy renders as TOML")
}

/// Well-formed policies (each parses), then a few the validator refuses.
pub fn seeds() -> (Vec<String>, Vec<String>) {
    let good = vec![
        tapjail_policy::config::EMBEDDED_DEFAULT.to_string(),
        r#"
socket = "/tmp/t/broker.sock"
audit_log = "/tmp/t/audit.jsonl"
state_dir = "/tmp/t/state"
worker_uids = [300000, 300999]
frontend = "nbd"

[[tenant]]
name = "alice"
uids = [4242]
image_roots = ["/srv/alice/"]
writable = true
max_disks = 2
minors = [0, 99]

[[tenant]]
name = "bob"
gids = [5000]
image_roots = ["/srv/bob"]
"#
        .to_string(),
        r#"
device_dir = "/dev/./tj//"
tapdisk = "/usr/libexec/tapjail/tapdisk"
worker_memlock_mib = 64
respawn = false
max_restarts_per_minute = 0
worker_timeout_secs = 5
operation_timeout_secs = 60
client_frame_timeout_secs = 2
max_clients = 128
audit_window_secs = 60
subuid_file = "/tmp/ids/subuid"
subgid_file = "/tmp/ids/subgid"
passwd_file = "/tmp/ids/passwd"
group_file = "/tmp/ids/group"
worker_uids = [1, 100]

[[tenant]]
name = "gold-users_1"
uids = [1000, 1001]
gids = [1000]
image_roots = ["/srv/users", { path = "/srv/gold", shared_readonly = true }]
minors = [100, 199]
max_clients = 4
admin = true
page_cache = false
share_parent = false
online_snapshot = false
disk_io = { write_iops = 500, write_iops_burst = 50, read_bps = 104857600 }
tenant_io = { write_bps = 209715200 }

[[tenant]]
name = "other"
uids = [2000]
image_roots = [{ path = "/srv/gold", shared_readonly = true }, "/srv/users/other"]
minors = [200, 16383]
max_disks = 0
"#
        .to_string(),
    ];
    let bad = vec![
        "worker_uids = [0, 10]\n[[tenant]]\nname = \"a\"\nuids = [5]\n".to_string(),
        "[[tenant]]\nname = \"a\"\nuids = [5]\n[[tenant]]\nname = \"b\"\nuids = [5]\n".to_string(),
        "[[tenant]]\nname = \"a\"\nuids = [5]\nimage_roots = [\"/\", \"rel\", \"/x/../y\"]\n"
            .to_string(),
        "[[tenant]]\nname = \"A!\"\nuids = [5]\nminors = [9, 1]\n".to_string(),
        "socket = 3\nbogus = true\n".to_string(),
    ];
    (good, bad)
}
