//! Stable stand-in for the `policy_toml` fuzzer, run in CI: valid and
//! invalid policies, mutations of them (byte flips, lines dropped or
//! repeated, numbers at their limits), then the committed corpus and any
//! local one.

use tapjail_fuzz::policy::seeds;

#[test]
fn policy_seeds_parse_or_are_refused() {
    let (good, bad) = seeds();
    for (i, p) in good.iter().enumerate() {
        assert!(tapjail_fuzz::policy_toml(p.as_bytes()), "good seed {i}");
    }
    for (i, p) in bad.iter().enumerate() {
        assert!(!tapjail_fuzz::policy_toml(p.as_bytes()), "bad seed {i}");
    }
}

#[test]
fn policy_mutations_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0xBB67_AE85_84CA_A73B);
    let mut next = || rng.next_u64();
    let numbers = [
        "0",
        "-1",
        "1",
        "4294967295",
        "4294967294",
        "16383",
        "16384",
        "9223372036854775807",
    ];
    let (good, bad) = seeds();
    let mut valid = 0;
    for seed in good.iter().chain(&bad) {
        for _ in 0..300 {
            let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
            let n = lines.len();
            let i = (next() as usize) % n;
            match next() % 4 {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                2 => {
                    let num = numbers[(next() as usize) % numbers.len()];
                    let l = &mut lines[i];
                    if let Some(at) = l.find(|c: char| c.is_ascii_digit()) {
                        let end = l[at..]
                            .find(|c: char| !c.is_ascii_digit())
                            .map_or(l.len(), |e| at + e);
                        l.replace_range(at..end, num);
                    }
                }
                _ => {
                    let mut b = lines[i].clone().into_bytes();
                    if !b.is_empty() {
                        let k = (next() as usize) % b.len();
                        b[k] = b"\"[]{}=,./-_ax0\n#"[(next() as usize) % 16];
                    }
                    lines[i] = String::from_utf8_lossy(&b).into_owned();
                }
            }
            if tapjail_fuzz::policy_toml(lines.join("\n").as_bytes()) {
                valid += 1;
            }
        }
    }
    // Enough mutants stay valid for the round trip to see new policies.
    assert!(valid > 200, "{valid}");
}

#[test]
fn policy_committed_corpus_gets_past_parsing() {
    let corpus = tapjail_fuzz::committed_corpus("policy_toml");
    assert!(
        corpus.len() >= 20,
        "corpus missing: {} entries",
        corpus.len()
    );
    let valid = corpus
        .iter()
        .filter(|m| tapjail_fuzz::policy_toml(m))
        .count();
    let toml = corpus
        .iter()
        .filter(|m| std::str::from_utf8(m).is_ok_and(|t| t.parse::<toml::Table>().is_ok()))
        .count();
    eprintln!(
        "{valid} valid policies, {toml} TOML documents of {}",
        corpus.len()
    );
    // libFuzzer's corpus explores the TOML parser's refusals most (22% of
    // the entries were TOML, 2.7% valid policies when committed); the
    // seeds and their mutations above carry the valid ones. Both stages
    // must still be reached.
    assert!(
        toml * 6 >= corpus.len(),
        "only {toml} of {} corpus entries are TOML",
        corpus.len()
    );
    assert!(valid * 50 >= corpus.len(), "only {valid} valid policies");
    for m in tapjail_fuzz::local_corpus("policy_toml") {
        tapjail_fuzz::policy_toml(&m);
    }
}
