//! Stable stand-in for the `nbd_client` fuzzer, run in CI: well-formed
//! client sessions (every option we answer, then every command), then
//! thousands of mutations of them (byte flips, option and request length
//! fields pushed to their limits, truncation), then the committed corpus
//! and any local one, all through `conn::serve` against an in-memory VHD.

use tapjail_fuzz::nbd::seeds;

#[test]
fn nbd_seeds_and_corpus_never_panic() {
    // The well-formed sessions get through negotiation to every request
    // (the last one only aborts), or the mutations below would test the
    // handshake alone.
    let seeds = seeds();
    for (i, s) in seeds.iter().enumerate() {
        let run = tapjail_fuzz::nbd_client(s);
        let want = if i + 1 == seeds.len() { 0 } else { 9 };
        assert_eq!(run.requests, want, "seed {i}: {run:?}");
        assert_eq!(run.replies, want, "seed {i}: {run:?}");
        assert!(run.clean || want == 0, "seed {i}: {run:?}");
    }
    for m in tapjail_fuzz::local_corpus("nbd_client") {
        tapjail_fuzz::nbd_client(&m);
    }
}

/// The committed corpus reaches the connection's I/O path: a good part of
/// its entries get replies to requests, not only through negotiation.
#[test]
fn nbd_committed_corpus_reaches_the_io_path() {
    let corpus = tapjail_fuzz::committed_corpus("nbd_client");
    assert!(
        corpus.len() >= 20,
        "corpus missing: {} entries",
        corpus.len()
    );
    let mut answered = 0;
    let mut replies = 0;
    for m in &corpus {
        let run = tapjail_fuzz::nbd_client(m);
        if run.replies > 0 {
            answered += 1;
        }
        replies += run.replies;
    }
    eprintln!(
        "{answered} of {} entries got replies ({replies} replies)",
        corpus.len()
    );
    // The rest explores negotiation (40% got replies when committed).
    assert!(
        answered * 3 >= corpus.len(),
        "only {answered} of {} corpus entries reached a reply",
        corpus.len()
    );
}

#[test]
fn nbd_mutated_sessions_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0x2545_F491_4F6C_DD1D);
    let mut next = || rng.next_u64();
    let interesting: [u32; 7] = [0, 1, 4, 28, 0x7fff_ffff, 0x8000_0000, u32::MAX];
    for seed in seeds() {
        for _ in 0..1000 {
            let mut d = seed.clone();
            match next() % 3 {
                0 => {
                    for _ in 0..3 {
                        let i = (next() as usize) % d.len();
                        d[i] = next() as u8;
                    }
                }
                // A length-like 4-byte field (option length, name length,
                // query count, request length) at a limit.
                1 => {
                    let v = interesting[(next() as usize) % interesting.len()];
                    let at = (next() as usize) % d.len().saturating_sub(4).max(1);
                    if at + 4 <= d.len() {
                        d[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
                _ => {
                    let n = (next() as usize) % (d.len() + 1);
                    d.truncate(n);
                }
            }
            let _ = tapjail_fuzz::nbd_client(&d);
        }
    }
}
