//! tap-broker refuses to start with worker uids that someone else owns
//! (issue 11 item 3: with useradd's defaults the 4th user's subordinate
//! uids covered the old default range, and from a user namespace she
//! could SIGSTOP workers and park processes on every worker uid).

use std::process::Command;

/// A policy using `worker_uids` and id files in `dir`: a subuid file as
/// useradd writes it for four users, an empty subgid file, and passwd and
/// group files with one service user each.
fn setup(dir: &std::path::Path, range: (u32, u32)) -> std::path::PathBuf {
    std::fs::write(
        dir.join("subuid"),
        "alice:100000:65536\nbob:165536:65536\ncarol:231072:65536\ndave:296608:65536\n",
    )
    .unwrap();
    std::fs::write(dir.join("subgid"), "").unwrap();
    std::fs::write(dir.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("group"), "root:x:0:\n").unwrap();
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "socket = {:?}\naudit_log = {:?}\nstate_dir = {:?}\nworker_uids = [{}, {}]\n\
             subuid_file = {:?}\nsubgid_file = {:?}\npasswd_file = {:?}\ngroup_file = {:?}\n\
             [[tenant]]\nname = \"a\"\nuids = [7]\n",
            dir.join("b.sock"),
            dir.join("audit.jsonl"),
            dir.join("state"),
            range.0,
            range.1,
            dir.join("subuid"),
            dir.join("subgid"),
            dir.join("passwd"),
            dir.join("group"),
        ),
    )
    .unwrap();
    p
}

#[test]
fn worker_uids_in_a_users_subuid_range_stop_the_broker_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), (300_000, 300_999));
    for check in [true, false] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tap-broker"));
        if check {
            c.arg("--check");
        }
        let out = c.arg("--config").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "check={check}");
        // Its stderr is a pipe: the error is a JSON log line.
        let err = String::from_utf8_lossy(&out.stderr);
        let said: String = err
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["level"] == "ERROR")
            .filter_map(|e| e["message"].as_str().map(str::to_owned))
            .collect();
        assert!(
            said.contains(&format!(
                "{}:4: subordinate uids 296608..=362143 of \"dave\" overlap worker_uids",
                dir.path().join("subuid").display()
            )) && said.contains("worker_uids 300000..=300999 are not free"),
            "{err}"
        );
        assert!(!dir.path().join("b.sock").exists(), "never started serving");
        assert!(!dir.path().join("audit.jsonl").exists());
    }
    // Outside every range it passes the same check.
    let p = setup(dir.path(), (500_000, 500_999));
    let out = Command::new(env!("CARGO_BIN_EXE_tap-broker"))
        .args(["--check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn worker_uids_default_range_is_free_on_this_host() {
    // The embedded default, checked against this machine's real
    // /etc/subuid, /etc/subgid, /etc/passwd and /etc/group.
    let out = Command::new(env!("CARGO_BIN_EXE_tap-broker"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = tapjail_policy::Policy::embedded_default();
    assert_eq!(p.worker_uids, tapjail_policy::config::defaults::WORKER_UIDS);
    let c =
        tapjail_policy::idmap::clashes(&p.id_files, p.worker_uids, &tapjail_policy::IdFiles::look)
            .expect("id files readable");
    assert!(c.is_empty(), "{c:?}");
}
