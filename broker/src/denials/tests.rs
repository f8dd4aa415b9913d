use super::*;

fn p(uid: u32) -> PeerCred {
    PeerCred {
        pid: 1,
        uid,
        gid: uid,
    }
}

const MS: Duration = Duration::from_millis(1);

/// Line budgets only (bytes plentiful), as before bytes were counted.
fn lim(lines_per_uid: u32, lines_total: u32, max_uids: usize) -> DenialLimiter {
    DenialLimiter::new(
        Class::Stranger,
        Budget {
            window: Duration::from_secs(10),
            lines_per_uid,
            bytes_per_uid: u64::MAX,
            lines_total,
            bytes_total: u64::MAX,
            max_uids,
        },
    )
}

/// The line of the 65,500-byte `\x01` path, as a stranger's (kind
/// only) and as a tenant's (capped) entry.
fn hostile(tenant: Option<&str>) -> Entry {
    let path = "\x01".repeat(65_500);
    Entry {
        event: Event::Request,
        peer: Some(Peer {
            pid: 1,
            uid: 7,
            gid: 7,
        }),
        tenant: tenant.map(String::from),
        request: Some(serde_json::json!({"Open": {"image": {"kind": "Vhd", "path": path}}})),
        decision: Verdict::Deny,
        rule: if tenant.is_some() {
            "outside-roots"
        } else {
            "no-tenant"
        }
        .into(),
        reason: format!("{path} is outside your image roots"),
        outcome: None,
    }
}

/// Bytes written for a flood of `n` copies of `entry` from `uids`
/// uids in one window: full lines plus summary lines, as the broker
/// writes them.
fn flood(entry: &Entry, uids: u32, n: u32) -> (u64, u64, u64) {
    let mut d = Denials::new(Duration::from_secs(10));
    let class = Denials::class_of(entry).unwrap();
    let shaped = Denials::shape(class, entry).bounded();
    let len = shaped.line_len();
    let t0 = Instant::now();
    let mut per_uid: HashMap<u32, u64> = HashMap::new();
    let mut counted = 0;
    for i in 0..n {
        let uid = 10_000 + i % uids;
        if d.admit(class, p(uid), &shaped.rule, len, t0) == Admit::Full {
            *per_uid.entry(uid).or_default() += len as u64;
        } else {
            counted += 1;
        }
    }
    let sums = d.due(t0 + Duration::from_secs(10), false);
    let mut total: u64 = per_uid.values().sum();
    for s in &sums {
        let len = s.entry(Some("t".repeat(64))).line_len() as u64;
        assert!(len <= SUMMARY_RESERVE, "summary line of {len} bytes");
        total += len;
        if let Some(uid) = s.uid {
            *per_uid.entry(uid).or_default() += len;
        }
    }
    let sum_counted: u64 = sums.iter().map(|s| s.suppressed).sum();
    assert_eq!(sum_counted, counted, "every denial accounted for");
    (per_uid.values().copied().max().unwrap_or(0), total, counted)
}

#[test]
fn denials_hostile_paths_stay_within_the_byte_budgets() {
    // One stranger, 2000 frames: a few lines by kind only.
    let (one, total, _) = flood(&hostile(None), 1, 2000);
    assert!(
        one <= BYTES_PER_UID && total <= BYTES_PER_UID,
        "{one} {total}"
    );
    // 300 stranger uids: each within its budget, all within 1 MiB.
    let (one, total, _) = flood(&hostile(None), 300, 6000);
    assert!(one <= BYTES_PER_UID, "{one}");
    assert!(total <= BYTES_TOTAL, "{total}");
    // A tenant's denials keep the (capped) path, and are budgeted.
    let e = hostile(Some("bob"));
    assert!(Denials::shape(Class::Tenant, &e).line_len() > 4096);
    let (one, _, counted) = flood(&e, 1, 2000);
    assert!(one <= BYTES_PER_UID, "{one}");
    assert!(counted > 1900, "{counted}");
    // 300 uids of one tenant (a gid match): within 1 MiB all told.
    let (_, total, _) = flood(&e, 300, 3000);
    assert!(total <= BYTES_TOTAL, "{total}");
}

#[test]
fn denials_strangers_and_protocol_errors_are_logged_by_kind() {
    let e = Denials::shape(Class::Stranger, &hostile(None));
    assert_eq!(e.request, Some(serde_json::json!({"kind": "Open"})));
    let mut proto = hostile(Some("bob"));
    proto.rule = "protocol".into();
    assert_eq!(
        Denials::shape(Class::Tenant, &proto).request,
        Some(serde_json::json!({"kind": "Open"}))
    );
    let mut allowed = hostile(Some("bob"));
    allowed.decision = Verdict::Allow;
    assert_eq!(
        Denials::class_of(&allowed),
        None,
        "allowed lines are never limited"
    );
}

#[test]
fn denials_first_n_in_full_then_one_summary_per_window() {
    let mut l = lim(3, 100, 10);
    let t0 = Instant::now();
    let admits: Vec<Admit> = (0..1000)
        .map(|i| {
            let kind = if i % 2 == 0 { "no-tenant" } else { "frame" };
            l.admit(p(7), kind, 100, t0 + MS * i)
        })
        .collect();
    assert_eq!(admits.iter().filter(|a| **a == Admit::Full).count(), 3);
    assert!(admits[..3].iter().all(|a| *a == Admit::Full));
    // Nothing is due while the window is open.
    assert!(l.due(t0 + Duration::from_secs(9), false).is_empty());
    let s = l.due(t0 + Duration::from_secs(10), false);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].uid, Some(7));
    assert_eq!(s[0].suppressed, 997);
    assert_eq!(
        s[0].kinds.iter().map(String::as_str).collect::<Vec<_>>(),
        ["frame", "no-tenant"]
    );
    assert_eq!(
        s[0].describe(),
        "uid 7: 997 further denied request(s) of kinds {frame, no-tenant} suppressed in the last 10 s"
    );
    // Reported once; the next window starts with a full budget.
    assert!(l.due(t0 + Duration::from_secs(30), false).is_empty());
    assert_eq!(
        l.admit(p(7), "no-tenant", 100, t0 + Duration::from_secs(31)),
        Admit::Full
    );
}

#[test]
fn denials_of_one_uid_do_not_use_up_another_uids_budget() {
    let mut l = lim(2, 100, 10);
    let t0 = Instant::now();
    for i in 0..50 {
        l.admit(p(7), "no-tenant", 100, t0 + MS * i);
    }
    assert_eq!(l.admit(p(8), "no-tenant", 100, t0 + MS * 60), Admit::Full);
    assert_eq!(l.admit(p(8), "no-tenant", 100, t0 + MS * 61), Admit::Full);
    assert_eq!(
        l.admit(p(8), "no-tenant", 100, t0 + MS * 62),
        Admit::Counted
    );
    let s = l.due(t0, true);
    assert_eq!(
        s.iter().map(|s| (s.uid, s.suppressed)).collect::<Vec<_>>(),
        [(Some(7), 48), (Some(8), 1)]
    );
}

#[test]
fn denials_of_many_uids_stay_within_the_shared_budget() {
    // 10 000 uids (a user namespace's subordinate range), 5 each.
    let mut l = lim(3, 50, 100);
    let t0 = Instant::now();
    let mut full = 0;
    for uid in 0..10_000u32 {
        for _ in 0..5 {
            if l.admit(p(uid), "no-tenant", 100, t0 + MS) == Admit::Full {
                full += 1;
            }
        }
    }
    // The class's 50 lines (uids 0-16), then the first line of each of
    // the 83 other tracked uids: never more than lines_total + max_uids.
    assert_eq!(full, 50 + 83);
    let s = l.due(t0 + Duration::from_secs(11), false);
    // 100 tracked uids and one shared line, whatever the number of uids.
    assert_eq!(s.len(), 101);
    assert_eq!(s.last().unwrap().uid, None);
    let counted: u64 = s.iter().map(|s| s.suppressed).sum();
    assert_eq!(counted + full, 50_000, "every denial is accounted for");
    assert!(s.last().unwrap().describe().contains("last: uid 9999"));
}

#[test]
fn denials_summary_of_a_quiet_window_is_empty() {
    let mut l = lim(3, 100, 10);
    let t0 = Instant::now();
    l.admit(p(7), "no-tenant", 100, t0);
    assert!(l.due(t0 + Duration::from_secs(11), false).is_empty());
    assert!(l.per_uid.is_empty());
}

#[test]
fn denials_every_uid_gets_its_first_line_even_after_others_spent_the_class_lines() {
    // uid 1 floods first and spends the class's 5 lines; each later uid
    // still has its first denial written in full (who knocks), then only
    // counts; an untracked uid beyond max_uids gets no such privilege.
    let mut l = lim(10, 5, 4);
    let t0 = Instant::now();
    for i in 0..20 {
        l.admit(p(1), "no-tenant", 100, t0 + MS * i);
    }
    for uid in 2..=4 {
        assert_eq!(l.admit(p(uid), "no-tenant", 100, t0 + MS * 30), Admit::Full);
        assert_eq!(
            l.admit(p(uid), "no-tenant", 100, t0 + MS * 31),
            Admit::Counted
        );
    }
    assert_eq!(
        l.admit(p(5), "no-tenant", 100, t0 + MS * 40),
        Admit::Counted
    );
}
