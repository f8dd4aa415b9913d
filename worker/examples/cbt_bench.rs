//! The cost of changed-block tracking on the write path (see
//! bench/cbt.sh): the same writes on a raw image with and without a
//! tracked bitmap whose log is made durable before each write that dirties
//! a new 64 KiB block. Prints writes/s of each and the ratio, per pattern.
//!
//!   cargo run --release -p tapjail-worker --example cbt_bench -- DIR [THREADS] [ROUNDS]

use std::fs::OpenOptions;
use std::sync::Arc;
use std::time::Instant;
use tapjail_worker::cbt::control::LogFile;
use tapjail_worker::cbt::{Bitmap, Tracked, Tracker};
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::Image;

const SIZE: u64 = 1 << 30;
const WRITES: u64 = 4096;

fn image(dir: &std::path::Path, name: &str) -> Arc<dyn Image> {
    let path = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    Arc::new(RawImage::open(Box::new(f), name, false).unwrap())
}

fn tracked(dir: &std::path::Path, img: Arc<dyn Image>) -> Arc<dyn Image> {
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("bench.cbt"))
        .unwrap();
    let tracker = Arc::new(Tracker::default());
    tracker
        .add(Bitmap::create("bench", SIZE, Box::new(LogFile(log))).unwrap())
        .unwrap();
    Tracked::wrap(img, tracker)
}

/// Offsets of a pattern, `WRITES` of 4 KiB.
fn offsets(pattern: &str) -> Vec<u64> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..WRITES)
        .map(|i| match pattern {
            "sequential" => i * 4096,
            // Every write in a block nobody wrote yet.
            "random-new" => {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % (SIZE / 65536)) * 65536
            }
            _ => unreachable!(),
        })
        .collect()
}

/// Writes per second of `offs` on `img` from `threads` threads, each write
/// followed by a flush (an FUA write, as a journaling guest issues).
fn run(img: &Arc<dyn Image>, offs: &[u64], threads: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|sc| {
        for t in 0..threads {
            let img = img.clone();
            sc.spawn(move || {
                let buf = vec![0x5au8; 4096];
                for off in offs.iter().skip(t).step_by(threads) {
                    img.write_at(&buf, *off).unwrap();
                    img.flush().unwrap();
                }
            });
        }
    });
    offs.len() as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("DIR (on a real disk, not tmpfs)"));
    let threads: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let rounds: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    println!("{WRITES} writes of 4 KiB + flush each, {threads} threads, {rounds} rounds (medians)");
    for pattern in ["random-new", "sequential"] {
        let offs = offsets(pattern);
        // (first touch, rewrite) of each contender, per round.
        let (mut plain, mut cbt) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let both = |img: Arc<dyn Image>| {
                let first = run(&img, &offs, threads);
                // The same blocks again: allocated in the file, and for
                // cbt already marked (no log write).
                (first, run(&img, &offs, threads))
            };
            let p = || both(image(&dir, "plain.img"));
            let c = || both(tracked(&dir, image(&dir, "cbt.img")));
            // Alternate who goes first.
            if round % 2 == 0 {
                plain.push(p());
                cbt.push(c());
            } else {
                cbt.push(c());
                plain.push(p());
            }
        }
        let pf = median(plain.iter().map(|x| x.0).collect());
        let pr = median(plain.iter().map(|x| x.1).collect());
        let cf = median(cbt.iter().map(|x| x.0).collect());
        let cr = median(cbt.iter().map(|x| x.1).collect());
        let spread = |v: &[(f64, f64)], w: &[(f64, f64)], k: fn(&(f64, f64)) -> f64| {
            let r: Vec<f64> = v.iter().zip(w).map(|(a, b)| k(a) / k(b)).collect();
            let lo = r.iter().cloned().fold(f64::MAX, f64::min);
            let hi = r.iter().cloned().fold(0.0, f64::max);
            format!("{lo:.2}..{hi:.2}")
        };
        println!(
            "{pattern:>11} first touch: plain {pf:>7.0}/s cbt {cf:>7.0}/s ratio {:.2} ({})",
            cf / pf,
            spread(&cbt, &plain, |x| x.0)
        );
        println!(
            "{pattern:>11} rewrite:     plain {pr:>7.0}/s cbt {cr:>7.0}/s ratio {:.2} ({})",
            cr / pr,
            spread(&cbt, &plain, |x| x.1)
        );
    }
}
