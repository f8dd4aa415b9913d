//! Stable stand-in for the `nbd_client` fuzzer, run in CI: well-formed
//! client sessions (every option we answer, then every command), then
//! thousands of mutations of them (byte flips, option and request length
//! fields pushed to their limits, truncation), plus any local corpus.

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn name_and(name: &str, rest: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(rest);
    d
}

fn req(flags: u16, kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&7u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn seeds() -> Vec<Vec<u8>> {
    let query = {
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        q
    };
    let go = name_and("disk", &[0, 1, 0, 3]);
    let requests: Vec<u8> = [
        req(0, 0, 0, 4096),             // READ
        req(1, 1, 4096, 0),             // WRITE, FUA, empty
        req(0, 3, 0, 0),                // FLUSH
        req(0, 4, 1 << 20, 1 << 20),    // TRIM
        req(2, 6, 0, 65536),            // WRITE_ZEROES, NO_HOLE
        req(8, 7, 0, u32::MAX),         // BLOCK_STATUS, REQ_ONE
        req(0, 0, u64::MAX - 10, 4096), // READ past the end
        req(0, 99, 0, 0),               // unknown command
        req(0, 2, 0, 0),                // DISC
    ]
    .concat();
    let mut sessions = Vec::new();
    for flags in [3u32, 1] {
        let mut s = flags.to_be_bytes().to_vec();
        s.extend(opt(8, &[])); // STRUCTURED_REPLY
        s.extend(opt(9, &name_and("disk", &query))); // LIST_META_CONTEXT
        s.extend(opt(10, &name_and("disk", &query))); // SET_META_CONTEXT
        s.extend(opt(3, &[])); // LIST
        s.extend(opt(6, &go)); // INFO
        s.extend(opt(5, &[])); // STARTTLS: refused
        s.extend(opt(7, &go)); // GO
        s.extend_from_slice(&requests);
        s.push(flags as u8);
        sessions.push(s);
    }
    // Old-style EXPORT_NAME, then requests.
    let mut s = 1u32.to_be_bytes().to_vec();
    s.extend(opt(1, b"disk"));
    s.extend_from_slice(&requests);
    sessions.push(s);
    sessions.push(
        3u32.to_be_bytes()
            .iter()
            .copied()
            .chain(opt(2, &[]))
            .collect(),
    );
    sessions
}

#[test]
fn nbd_seeds_and_corpus_never_panic() {
    // The well-formed sessions get through negotiation to every request
    // (the last one only aborts), or the mutations below would test the
    // handshake alone.
    let seeds = seeds();
    for (i, s) in seeds.iter().enumerate() {
        let checked = tapjail_fuzz::nbd_client(s);
        let want = if i + 1 == seeds.len() { 0 } else { 9 };
        assert_eq!(checked, want, "seed {i}");
    }
    for m in tapjail_fuzz::local_corpus("nbd_client") {
        tapjail_fuzz::nbd_client(&m);
    }
}

#[test]
fn nbd_mutated_sessions_never_panic() {
    let mut rng = tapjail_fuzz::XorShift(0x2545_F491_4F6C_DD1D);
    let mut next = || rng.next_u64();
    let interesting: [u32; 7] = [0, 1, 4, 28, 0x7fff_ffff, 0x8000_0000, u32::MAX];
    for seed in seeds() {
        for _ in 0..3000 {
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
