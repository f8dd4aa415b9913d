//! Stable stand-in for the `fuse_request` fuzzer, run in CI: well-formed
//! kernel messages for every opcode the frontend handles, then thousands of
//! mutations of them (byte flips, length and size fields pushed to their
//! limits, truncation), plus any local corpus.

use tapjail_fuzz::fuse::seeds;

#[test]
fn fuse_seeds_and_corpus_never_panic() {
    for m in seeds() {
        assert!(tapjail_fuzz::fuse_request(&m), "a seed does not parse");
    }
    for m in tapjail_fuzz::local_corpus("fuse_request") {
        tapjail_fuzz::fuse_request(&m);
    }
}

#[test]
fn fuse_mutated_messages_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0x9E37_79B9_7F4A_7C15);
    let mut next = || rng.next_u64();
    let interesting: [u32; 6] = [0, 1, 39, 40, 0x7fff_ffff, u32::MAX];
    for seed in seeds() {
        for _ in 0..2000 {
            let mut d = seed.clone();
            match next() % 4 {
                // Flip a few bytes anywhere.
                0 => {
                    for _ in 0..3 {
                        let i = (next() as usize) % d.len();
                        d[i] = next() as u8;
                    }
                }
                // A length-like field (header len, extlen, size) at a limit.
                1 => {
                    let v = interesting[(next() as usize) % interesting.len()];
                    let at = [0usize, 36, 56, 40 + 16][(next() as usize) % 4];
                    if at + 4 <= d.len() {
                        d[at..at + 4].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                // Truncate, keeping the header's claimed length.
                2 => {
                    let n = (next() as usize) % (d.len() + 1);
                    d.truncate(n);
                }
                // Truncate and fix the header length to match.
                _ => {
                    let n = 40 + (next() as usize) % (d.len() - 39);
                    d.truncate(n);
                    d[..4].copy_from_slice(&(n as u32).to_ne_bytes());
                }
            }
            let _ = tapjail_fuzz::fuse_request(&d);
        }
    }
}

/// The committed corpus gets past parsing: most entries are requests the
/// filesystem answers.
#[test]
fn fuse_committed_corpus_parses() {
    let corpus = tapjail_fuzz::committed_corpus("fuse_request");
    assert!(corpus.len() >= 20, "corpus missing");
    let parsed = corpus
        .iter()
        .filter(|m| tapjail_fuzz::fuse_request(m))
        .count();
    eprintln!("{parsed} of {} entries parsed", corpus.len());
    assert!(
        parsed * 2 >= corpus.len(),
        "only {parsed} of {} corpus entries parsed",
        corpus.len()
    );
}
