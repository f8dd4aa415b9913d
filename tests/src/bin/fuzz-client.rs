//! Throws malformed, oversized, truncated and random frames at tap-broker,
//! one connection per case, as whatever uid it was started as.
//!
//! Usage: fuzz-client SOCKET SEED COUNT [hello]
//! With `hold`, it opens COUNT connections, says nothing on them, prints
//! `held` and keeps them for 10 s (a slot hog).
//! With `hellohold`, it opens COUNT connections one after another, says
//! Hello on each and prints `greeted G refused R: FIRST-REFUSAL`, then
//! keeps the greeted ones until its stdin closes (a tenant's slot hog).
//! With `hello`, every case is one well-formed Hello and its answer (a
//! flood of exactly COUNT requests, each decided and audited once).
//! Prints how many cases it sent. Exits 0 unless the broker became
//! unreachable (which is what the test checks for).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tapjail_common::frame;
use tapjail_common::proto::{ImageKind, ImageSpec, Request, PROTOCOL_VERSION};
use tapjail_common::Minor;

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn valid_request(r: &mut Rng) -> Request {
    let m = Minor::new(r.below(16384)).unwrap_or_else(|_| Minor::new(0).expect("0"));
    let pid = Some(r.below(1 << 22) as u32);
    match r.below(8) {
        0 => Request::List {
            pid: None,
            minor: None,
        },
        1 => Request::Free { minor: m },
        2 => Request::Stats { pid, minor: m },
        3 => Request::Close {
            pid,
            minor: m,
            force: true,
        },
        4 => Request::Open {
            pid,
            minor: m,
            image: ImageSpec {
                kind: ImageKind::Vhd,
                path: "/../../etc/shadow".into(),
            },
            read_only: false,
        },
        5 => Request::Hello {
            version: r.below(4) as u32,
        },
        6 => Request::Destroy { pid, minor: m },
        _ => Request::Pause { pid, minor: m },
    }
}

fn case(sock: &std::path::Path, r: &mut Rng) -> std::io::Result<()> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.set_write_timeout(Some(Duration::from_millis(300)))?;
    let hello = r.below(2) == 0;
    if hello {
        let _ = frame::send_on(
            &s,
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        );
    }
    let payload = postcard::to_allocvec(&valid_request(r)).unwrap_or_default();
    match r.below(9) {
        // Random bytes, any length.
        0 => {
            let n = r.below(300) as usize;
            let _ = s.write_all(&r.bytes(n));
        }
        // A huge length prefix.
        1 => {
            let _ = s.write_all(&(u32::MAX - r.below(1000) as u32).to_be_bytes());
            let _ = s.write_all(&r.bytes(64));
        }
        // Just over the limit.
        2 => {
            let _ = s.write_all(&((64 * 1024 + 1 + r.below(100)) as u32).to_be_bytes());
        }
        // Truncated: header promises more than follows.
        3 => {
            let _ = s.write_all(&(payload.len() as u32 + 10).to_be_bytes());
            let _ = s.write_all(&payload);
        }
        // Valid length, corrupted payload.
        4 => {
            let mut p = payload.clone();
            if !p.is_empty() {
                let i = r.below(p.len() as u64) as usize;
                p[i] ^= 1 + r.below(255) as u8;
            }
            let _ = s.write_all(&(p.len() as u32).to_be_bytes());
            let _ = s.write_all(&p);
        }
        // Half a header.
        5 => {
            let _ = s.write_all(&[0, 0]);
        }
        // A valid request (possibly without Hello first).
        6 => {
            let _ = s.write_all(&(payload.len() as u32).to_be_bytes());
            let _ = s.write_all(&payload);
        }
        // A valid request carrying file descriptors.
        7 => {
            let f = std::fs::File::open("/dev/null")?;
            let _ = frame::send_on(&s, &valid_request(r), &[f.as_fd()]);
        }
        // Zero-length frame.
        _ => {
            let _ = s.write_all(&0u32.to_be_bytes());
        }
    }
    // Read whatever comes back until the broker closes or goes quiet.
    let _ = frame::recv_on::<_, tapjail_common::proto::Reply>(&s, 1 << 20);
    Ok(())
}

/// One connection, one valid Hello, its answer.
fn hello(sock: &std::path::Path) -> std::io::Result<()> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sent = frame::send_on(
        &s,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
        &[],
    );
    // A broker at its connection limit answers and closes at once, maybe
    // before our Hello is written (EPIPE): its answer is still ours to read.
    match (
        sent,
        frame::recv_on::<_, tapjail_common::proto::Reply>(&s, 1 << 20),
    ) {
        (_, Ok(_)) => Ok(()),
        (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(std::io::Error::other(e)),
    }
}

/// Connect and say Hello: the open connection if greeted, else why not.
fn greet(sock: &std::path::Path) -> std::io::Result<Result<UnixStream, String>> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // A refused connection may be closed before our Hello is written.
    let _ = frame::send_on(
        &s,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
        &[],
    );
    match frame::recv_on::<_, tapjail_common::proto::Reply>(&s, 1 << 20) {
        Ok((tapjail_common::proto::Reply::Hello { .. }, _)) => Ok(Ok(s)),
        Ok((other, _)) => Ok(Err(format!("{other:?}"))),
        Err(e) => Ok(Err(e.to_string())),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(sock), Some(seed), Some(count)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: fuzz-client SOCKET SEED COUNT");
        std::process::exit(2);
    };
    let sock = std::path::PathBuf::from(sock);
    let mut r = Rng(seed.parse::<u64>().unwrap_or(1) | 1);
    let count: u64 = count.parse().unwrap_or(100);
    if args.get(4).is_some_and(|a| a == "hold") {
        let held: Vec<UnixStream> = (0..count)
            .filter_map(|_| UnixStream::connect(&sock).ok())
            .collect();
        println!("held {}", held.len());
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(10));
        return;
    }
    if args.get(4).is_some_and(|a| a == "hellohold") {
        let mut held = Vec::new();
        let mut refused = 0;
        let mut first_refusal = String::new();
        for _ in 0..count {
            match greet(&sock) {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(why)) => {
                    refused += 1;
                    if first_refusal.is_empty() {
                        first_refusal = why;
                    }
                }
                Err(e) => {
                    eprintln!("broker unreachable: {e}");
                    std::process::exit(1);
                }
            }
        }
        println!("greeted {} refused {refused}: {first_refusal}", held.len());
        let _ = std::io::stdout().flush();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        return;
    }
    let only_hello = args.get(4).is_some_and(|a| a == "hello");
    for i in 0..count {
        let r = if only_hello {
            hello(&sock)
        } else {
            case(&sock, &mut r)
        };
        if let Err(e) = r {
            eprintln!("case {i}: broker unreachable: {e}");
            std::process::exit(1);
        }
    }
    println!("{count}");
}
