//! Stable stand-in for the fuzzer, run in CI: feed every seed (and every
//! file of a local corpus, if one exists) through the harness, plus
//! mutations of the seeds.

use std::path::Path;

fn inputs() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["seeds", "corpus/open_read", "artifacts/open_read"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            out.push((
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn replay_seeds_and_corpus_never_panic() {
    let inputs = inputs();
    assert!(inputs.len() >= 3, "seeds missing: run fuzz/make-seeds.sh");
    for (name, data) in &inputs {
        eprintln!("{name}");
        let opened = tapjail_fuzz::open_read(data);
        let written = tapjail_fuzz::write_repair(data);
        if name.contains("seeds") {
            assert!(opened && written, "seed {name} does not open");
        }
    }
}

#[test]
fn replay_mutated_seeds_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0x2545_F491_4F6C_DD1D);
    for (_, seed) in inputs().iter().filter(|(n, _)| n.contains("seeds")) {
        for _ in 0..300 {
            let mut d = seed.clone();
            for _ in 0..4 {
                let x = rng.next_u64();
                if d.is_empty() {
                    break;
                }
                // Mutate the metadata-heavy start and end most.
                let n = d.len();
                let i = match x % 3 {
                    0 => (x >> 8) as usize % n.min(4096),
                    1 => n - 1 - (x >> 8) as usize % n.min(512),
                    _ => (x >> 8) as usize % n,
                };
                d[i] = (x >> 32) as u8;
            }
            let _ = tapjail_fuzz::open_read(&d);
            let _ = tapjail_fuzz::write_repair(&d);
        }
    }
}

/// The committed corpora get past parsing: a good part of the entries
/// open as a VHD (read-only for `open_read`, writable for
/// `write_repair`); the rest explore the refusals of footer, header and
/// BAT checks. Thresholds sit below what the committed corpora reach
/// (see fuzz/README.md).
#[test]
fn image_committed_corpora_open() {
    for (target, f, tenths) in [
        ("open_read", tapjail_fuzz::open_read as fn(&[u8]) -> bool, 2),
        ("write_repair", tapjail_fuzz::write_repair, 1),
    ] {
        let corpus = tapjail_fuzz::committed_corpus(target);
        assert!(corpus.len() >= 20, "{target}: corpus missing");
        let opened = corpus.iter().filter(|m| f(m)).count();
        eprintln!("{target}: {opened} of {} entries opened", corpus.len());
        assert!(
            opened * 10 >= corpus.len() * tenths,
            "{target}: only {opened} of {} corpus entries opened",
            corpus.len()
        );
    }
}
