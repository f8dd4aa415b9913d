//! Stable stand-in for the `control_frames` fuzzer, run in CI: every
//! message of every channel, alone and in one stream, then mutations of
//! them (byte flips, length headers at their limits, truncation), then the
//! committed corpus and any local one.

use tapjail_fuzz::frames::{seeds, Channel};

#[test]
fn frame_seeds_decode_and_round_trip() {
    let seeds = seeds();
    assert!(seeds.len() > 40);
    for (i, (input, frames)) in seeds.iter().enumerate() {
        assert_eq!(
            tapjail_fuzz::control_frames(input),
            *frames,
            "seed {i} (channel tag {})",
            input[0]
        );
    }
}

#[test]
fn frame_mutations_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0x6A09_E667_F3BC_C909);
    let mut next = || rng.next_u64();
    let limits: [u32; 7] = [0, 1, 0xffff, 0x1_0000, 0x1_0001, 8 << 20, u32::MAX];
    let mut decoded = 0;
    for (seed, _) in seeds() {
        for _ in 0..200 {
            let mut d = seed.clone();
            match next() % 3 {
                0 => {
                    for _ in 0..3 {
                        let i = 1 + (next() as usize) % (d.len() - 1);
                        d[i] = next() as u8;
                    }
                }
                // The first frame's length header at a limit.
                1 => {
                    let v = limits[(next() as usize) % limits.len()];
                    d[1..5].copy_from_slice(&v.to_be_bytes());
                }
                _ => {
                    let n = 1 + (next() as usize) % d.len();
                    d.truncate(n);
                }
            }
            decoded += tapjail_fuzz::control_frames(&d);
        }
    }
    // Mutations keep many frames decodable, so the round trip is exercised
    // on values no seed holds.
    assert!(decoded > 1000, "{decoded}");
}

#[test]
fn oversized_frames_are_refused_by_every_receiver() {
    for ch in Channel::ALL {
        let mut d = vec![ch.tag()];
        d.extend_from_slice(&u32::try_from(ch.max() + 1).unwrap().to_be_bytes());
        d.extend_from_slice(&[0; 64]);
        assert_eq!(tapjail_fuzz::control_frames(&d), 0, "{ch:?}");
    }
}

#[test]
fn frame_committed_corpus_gets_past_parsing() {
    let corpus = tapjail_fuzz::committed_corpus("control_frames");
    assert!(
        corpus.len() >= 20,
        "corpus missing: {} entries",
        corpus.len()
    );
    let decoded = corpus
        .iter()
        .filter(|m| tapjail_fuzz::control_frames(m) > 0)
        .count();
    eprintln!("{decoded} of {} entries decoded a frame", corpus.len());
    // Most of a minimized corpus explores refusals (bad headers, bad
    // postcard), but a good part must decode (31% when committed).
    assert!(
        decoded * 5 >= corpus.len(),
        "only {decoded} of {} corpus entries decoded a frame",
        corpus.len()
    );
    for m in tapjail_fuzz::local_corpus("control_frames") {
        tapjail_fuzz::control_frames(&m);
    }
}
