//! A seeded corrupt-image campaign through the offline tools, under a
//! 1 GiB address-space limit: hundreds of targeted mutations of footer,
//! header, BAT, batmap, sector bitmaps and parent locators (checksums
//! fixed up, so the parsers see them), plus truncations and random flips,
//! of tapjail and qemu images and of a differencing child.
//!
//! For every variant: no tool dies by a signal, hangs, panics or fails an
//! allocation; every failure says why on stderr; an image `check` passes
//! reads in full; and `repair` never makes an image worse: what read
//! before reads the same after, and when `repair` succeeds `check` agrees.
//!
//! `TAPJAIL_CAMPAIGN_SEED` and `TAPJAIL_CAMPAIGN_VARIANTS` replay or widen
//! a run; a failure names its seed and variant.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;

/// tap-ctl under `ulimit -v` (1 GiB) and a 30-second `timeout`.
fn limited(args: &[&str]) -> Output {
    Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "30",
            "sh",
            "-c",
            "ulimit -v 1048576 && exec \"$0\" \"$@\"",
        ])
        .arg(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("timeout(1) and sh are needed")
}

fn ok(args: &[&str]) {
    let o = limited(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    if o + 4 <= b.len() {
        b[o..o + 4].copy_from_slice(&v.to_be_bytes());
    }
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    if o + 8 <= b.len() {
        b[o..o + 8].copy_from_slice(&v.to_be_bytes());
    }
}

/// One's complement of the byte sum with the checksum field zeroed.
fn fix_sum(b: &mut [u8], start: usize, len: usize, at: usize) {
    if start + len > b.len() {
        return;
    }
    let r = &mut b[start..start + len];
    r[at..at + 4].fill(0);
    let sum = !r.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    r[at..at + 4].copy_from_slice(&sum.to_be_bytes());
}

fn fix_all(b: &mut [u8]) {
    let n = b.len();
    if n >= 512 {
        fix_sum(b, n - 512, 512, 64);
    }
    if n >= 1536 && &b[..8] == b"conectix" {
        fix_sum(b, 0, 512, 64);
    }
    if n >= 1536 && &b[512..520] == b"cxsparse" {
        fix_sum(b, 512, 1024, 36);
    }
}

/// Values that tend to sit on a boundary.
fn interesting(r: &mut Rng, len: u64) -> u64 {
    let (any, inside) = (r.next(), r.below(len));
    r.pick(&[
        0,
        1,
        511,
        512,
        513,
        len,
        len - 512,
        len + 512,
        u64::from(u32::MAX),
        u64::from(u32::MAX) - 1,
        u64::MAX,
        1 << 40,
        any,
        inside,
    ])
}

/// Apply one targeted mutation; returns its name.
fn mutate(r: &mut Rng, b: &mut Vec<u8>) -> String {
    let len = b.len() as u64;
    let sparse = len >= 1536 && &b[512..520] == b"cxsparse";
    let kind = r.below(if sparse { 12 } else { 4 });
    match kind {
        0 | 1 => {
            // A footer field (the end one, or the copy at 0).
            let at = if kind == 0 || !sparse {
                b.len() - 512
            } else {
                0
            };
            let (off, w) = r.pick(&[
                (0usize, 4u8),
                (8, 4),
                (12, 4),
                (16, 8),
                (28, 4),
                (32, 4),
                (40, 8),
                (48, 8),
                (56, 4),
                (60, 4),
                (68, 8),
                (84, 1),
            ]);
            let v = interesting(r, len);
            match w {
                8 => put64(b, at + off, v),
                4 => put32(b, at + off, v as u32),
                _ => b[at + off] = v as u8,
            }
            fix_all(b);
            format!("footer@{at}+{off}={v:#x}")
        }
        2 => {
            let n = r.below(len) as usize;
            b.truncate(n);
            format!("truncate to {n}")
        }
        3 => {
            let flips = 1 + r.below(8);
            for _ in 0..flips {
                let i = r.below(len) as usize;
                b[i] ^= 1 << r.below(8);
            }
            format!("{flips} random flips")
        }
        4 | 5 => {
            // A dynamic header field, or a parent locator entry.
            let off = if kind == 4 {
                r.pick(&[8usize, 16, 24, 28, 32, 40, 56])
            } else {
                576 + 24 * r.below(8) as usize + r.pick(&[0usize, 4, 8, 16])
            };
            let v = interesting(r, len);
            if matches!(off, 8 | 16) || (off >= 576 && (off - 576) % 24 == 16) {
                put64(b, 512 + off, v);
            } else {
                put32(b, 512 + off, v as u32);
            }
            fix_all(b);
            format!("header+{off}={v:#x}")
        }
        6 | 7 => {
            // A BAT entry: a boundary, or another entry's (overlap).
            let table = be64(b, 512 + 16) as usize;
            let n = be32(b, 512 + 28).min(64) as usize;
            let i = r.below(n as u64) as usize;
            let v = if kind == 6 {
                interesting(r, len / 512) as u32
            } else {
                be32(b, table + 4 * r.below(n as u64) as usize)
            };
            put32(b, table + 4 * i, v);
            format!("bat[{i}]={v:#x}")
        }
        8 | 9 => {
            // The batmap header or map, checksum fixed or not.
            let Some(h) = (0..b.len() / 512)
                .map(|i| i * 512)
                .find(|&o| &b[o..o + 8] == b"tdbatmap")
            else {
                return "no batmap: nothing".into();
            };
            let map = be64(b, h + 8) as usize;
            let what = if kind == 8 {
                let off = r.pick(&[8usize, 16, 20, 24, 28, 29]);
                let v = interesting(r, len);
                if off == 8 {
                    put64(b, h + off, v)
                } else {
                    put32(b, h + off, v as u32)
                }
                format!("batmap hdr+{off}={v:#x}")
            } else if map + 8 <= b.len() {
                b[map + r.below(8) as usize] = r.next() as u8;
                "batmap bits".to_string()
            } else {
                "batmap map outside".to_string()
            };
            if r.below(2) == 0 && map + 512 <= b.len() {
                let sum = !b[map..map + 512]
                    .iter()
                    .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
                put32(b, h + 24, sum);
            }
            what
        }
        10 => {
            // The sector bitmap of an allocated block.
            let table = be64(b, 512 + 16) as usize;
            let n = be32(b, 512 + 28).min(64) as usize;
            let used: Vec<u32> = (0..n)
                .map(|i| be32(b, table + 4 * i))
                .filter(|&e| e != u32::MAX)
                .collect();
            let Some(&e) = used.first() else {
                return "no block".into();
            };
            let at = e as usize * 512 + r.below(512) as usize;
            if at < b.len() {
                let any = r.next() as u8;
                b[at] = r.pick(&[0u8, 0xff, any]);
            }
            format!("bitmap of block at sector {e}")
        }
        _ => {
            // A cookie off by one byte, checksums fixed.
            let at = r.pick(&[0usize, 512, b.len() - 512]);
            b[at + r.below(8) as usize] ^= 0x20;
            fix_all(b);
            format!("cookie@{at}")
        }
    }
}

/// Seeds: tapjail dynamic with data (blocks at odd places), tapjail
/// fixed, a differencing child over the dynamic one, a qemu dynamic, a
/// differencing child of a raw parent.
fn seeds(dir: &Path) -> Vec<PathBuf> {
    let d = dir.join("seed-dyn.vhd");
    ok(&["vhd", "create", "-n", s(&d), "-s", "8"]);
    let f = dir.join("seed-fixed.vhd");
    ok(&["vhd", "create", "--fixed", "-n", s(&f), "-s", "2"]);
    let write = |p: &Path, off: u64, data: &[u8]| {
        use std::io::Write;
        let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
            .args(["vhd", "write", "-n", s(p), "-o", &off.to_string()])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(data).unwrap();
        assert!(c.wait().unwrap().success());
    };
    write(&d, 0, &[0x11; 4096]);
    write(&d, 2 * MIB, &vec![0x22; 2 * MIB as usize]);
    write(&d, 8 * MIB - 512, &[0x33; 512]);
    write(&f, 512, &[0x44; 1024]);
    let c = dir.join("seed-child.vhd");
    ok(&["vhd", "snapshot", "-n", s(&c), "-p", s(&d)]);
    write(&c, 4096, &[0x55; 8192]);
    let q = dir.join("seed-qemu.vhd");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", s(&q), "4M"])
        .output()
        .expect("qemu-img is needed for the campaign");
    assert!(o.status.success());
    let o = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x66 1024 70000", s(&q)])
        .output()
        .unwrap();
    assert!(o.status.success());
    // A child of a raw parent (`snapshot -m`): null parent UUID.
    let raw = dir.join("seed-base.raw");
    std::fs::write(&raw, vec![0x77; 4 * MIB as usize]).unwrap();
    let rc = dir.join("seed-rawchild.vhd");
    ok(&["vhd", "snapshot", "-m", "-n", s(&rc), "-p", s(&raw)]);
    write(&rc, 2 * MIB - 1024, &[0x88; 4096]);
    vec![d, f, c, q, rc]
}

/// Runs a tool on a variant and checks the invariants every run keeps.
fn run(args: &[&str], ctx: &str) -> Output {
    let o = limited(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "{ctx}: {args:?} ended with {:?} (signal, hang or crash): {err}",
        o.status
    );
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{ctx}: {args:?}: {err}"
    );
    if o.status.code() == Some(1) {
        // check and repair list problems on stdout, the rest say on stderr.
        let said = err.trim().len() + String::from_utf8_lossy(&o.stdout).trim().len();
        assert!(said > 10, "{ctx}: {args:?} failed saying nothing");
    }
    o
}

/// The first MiB as `read` serves it, or None if it refuses.
fn read_head(p: &Path, ctx: &str) -> Option<Vec<u8>> {
    let size = run(&["vhd", "query", "-n", s(p), "-v"], ctx);
    let mib: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().ok()?;
    let len = (mib * MIB).min(MIB);
    if len == 0 {
        return None;
    }
    let o = run(
        &["vhd", "read", "-n", s(p), "-o", "0", "-l", &len.to_string()],
        ctx,
    );
    o.status.success().then_some(o.stdout)
}

#[test]
fn campaign_seeded_corrupt_variants_never_crash_hang_or_get_worse() {
    let seed: u64 = std::env::var("TAPJAIL_CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7a9_1a11);
    let variants: usize = std::env::var("TAPJAIL_CAMPAIGN_VARIANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(320);
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seeds(tmp.path());
    let originals: Vec<Vec<u8>> = seeds.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut r = Rng(seed | 1);
    let mut served = 0;
    let mut repaired = 0;
    for v in 0..variants {
        let which = v % seeds.len();
        let mut b = originals[which].clone();
        let what = mutate(&mut r, &mut b);
        let ctx = format!(
            "seed {seed} variant {v} ({}: {what})",
            seeds[which].display()
        );
        // Mutate the seed in place so a child still finds its parent.
        let p = &seeds[which];
        std::fs::write(p, &b).unwrap();
        let checked = run(&["vhd", "check", "-n", s(p)], &ctx);
        let before = read_head(p, &ctx);
        if checked.status.success() {
            assert!(before.is_some(), "{ctx}: check passes but read fails");
        }
        served += usize::from(before.is_some());
        let len_before = b.len() as u64;
        let fixed = run(&["vhd", "repair", "-n", s(p)], &ctx);
        let len_after = std::fs::metadata(p).unwrap().len();
        assert!(
            len_after >= len_before,
            "{ctx}: repair shrank the file from {len_before} to {len_after} bytes"
        );
        let after = read_head(p, &ctx);
        if let Some(before) = &before {
            assert_eq!(
                after.as_ref(),
                Some(before),
                "{ctx}: repair changed the data"
            );
        }
        if fixed.status.success() {
            repaired += 1;
            let again = run(&["vhd", "check", "-n", s(p)], &ctx);
            assert!(
                again.status.success(),
                "{ctx}: repair succeeded, check disagrees: {}",
                String::from_utf8_lossy(&again.stdout)
            );
        }
        std::fs::write(p, &originals[which]).unwrap();
    }
    eprintln!("campaign: {variants} variants, {served} served, {repaired} repaired");
    assert!(
        served > variants / 10 && repaired > variants / 10,
        "mutations too weak"
    );
}
