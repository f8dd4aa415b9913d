//! Stable stand-in for the `mirror_server` fuzzer, run in CI: well-formed
//! secondaries (NBD_OPT_GO and the EXPORT_NAME fallback) get through to
//! every request; then every truncation and thousands of byte mutations
//! of them, and any local corpus, through the worker's mirror client.

use tapjail_fuzz::mirror::seeds;

#[test]
fn mirror_client_survives_hostile_secondaries() {
    let seeds = seeds();
    for (i, s) in seeds.iter().enumerate() {
        assert_eq!(tapjail_fuzz::mirror_server(s), Some(3), "seed {i}");
        for cut in 0..s.len() {
            tapjail_fuzz::mirror_server(&s[..cut]);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ i as u64;
        for _ in 0..5000 {
            let mut m = s.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % m.len();
                m[at] = match (x >> 32) % 4 {
                    0 => 0xff,
                    1 => 0,
                    2 => m[at] ^ (1 << ((x >> 40) % 8)),
                    _ => (x >> 48) as u8,
                };
            }
            tapjail_fuzz::mirror_server(&m);
        }
    }
    for m in tapjail_fuzz::local_corpus("mirror_server") {
        tapjail_fuzz::mirror_server(&m);
    }
}
