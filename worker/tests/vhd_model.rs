//! The engine against an in-memory model: a property test of random
//! writes, discards, zeroing, snapshots, coalesces and reopenings that
//! compares every byte, and several threads writing and reading at once.

mod common;

use common::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tapjail_ctl::files::{check_path, coalesce_path, create_path, snapshot_path};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::VhdImage;
use tapjail_worker::image::Image;

const SIZE: u64 = 3 << 20; // 48 blocks of 64 KiB; not a multiple of 2 MiB
const BS: u32 = 65536;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Snapshot,
    Coalesce,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly small, sometimes whole blocks or many of them; any alignment.
    prop_oneof![
        (0..SIZE, 1..5000u64),
        (0..SIZE / u64::from(BS), 1..4u64)
            .prop_map(|(b, n)| (b * u64::from(BS), n * u64::from(BS))),
        (0..SIZE, 1..300_000u64),
    ]
    .prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len: len as usize, seed }),
        2 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Coalesce),
        1 => Just(Op::Reopen),
    ]
}

struct World {
    dir: PathBuf,
    /// Files of the chain, root first; the last is the leaf.
    chain: Vec<PathBuf>,
    img: Option<VhdImage>,
    model: Vec<u8>,
    n: usize,
}

impl World {
    fn leaf(&self) -> &Path {
        self.chain.last().unwrap()
    }
    fn img(&self) -> &VhdImage {
        self.img.as_ref().unwrap()
    }
    fn reopen(&mut self) {
        self.img = None;
        self.img = Some(open(self.leaf(), false));
    }
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, seed } => {
                let d = pattern(seed, len);
                self.img().write_at(&d, off).unwrap();
                self.model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            Op::Discard { off, len } => {
                self.img().discard(off, len).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zero { off, len, unmap } => {
                self.img().write_zeroes(off, len, unmap).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Snapshot => {
                self.img().flush().unwrap();
                self.img = None;
                self.n += 1;
                let child = self.dir.join(format!("s{}.vhd", self.n));
                snapshot_path(&child, self.leaf(), BS).unwrap();
                self.chain.push(child);
                self.reopen();
            }
            Op::Coalesce => {
                if self.chain.len() < 2 {
                    return;
                }
                self.img().flush().unwrap();
                self.img = None;
                let leaf = self.chain.pop().unwrap();
                coalesce_path(&leaf, &mut |_, _| {}).unwrap();
                std::fs::remove_file(leaf).unwrap();
                self.reopen();
            }
            Op::Reopen => {
                self.img().flush().unwrap();
                self.reopen();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn model_random_operations_match_byte_for_byte(ops in proptest::collection::vec(op(), 1..24), fixed_root in any::<bool>()) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root.vhd");
        let kind = if fixed_root { CreateKind::Fixed } else { CreateKind::Dynamic { block_size: BS } };
        create_path(&root, SIZE, &kind).unwrap();
        let mut w = World { dir: tmp.path().to_path_buf(), chain: vec![root], img: None, model: vec![0; SIZE as usize], n: 0 };
        w.reopen();
        for op in &ops {
            w.apply(op);
            prop_assert!(read_all(w.img()) == w.model, "after {:?}", op);
        }
        w.img().flush().unwrap();
        w.img = None;
        for p in &w.chain {
            let problems = check_path(p).unwrap();
            prop_assert!(problems.is_empty(), "{}: {:?}", p.display(), problems);
        }
        prop_assert!(read_all(&open(w.leaf(), true)) == w.model);
    }
}

/// Several threads write disjoint, interleaved 4 KiB stripes (so they
/// share blocks: allocation and bitmap updates race) and read them back
/// while the others write.
fn concurrent(img: Arc<dyn Image>, base: Vec<u8>) {
    const THREADS: usize = 4;
    const STRIPE: u64 = 4096;
    let size = img.virtual_size();
    let stripes = size / STRIPE;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let mut mine = base.clone();
            std::thread::spawn(move || {
                let mut x = t as u64 * 7919 + 1;
                for i in 0..300u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let s = ((x >> 33) % (stripes / THREADS as u64)) * THREADS as u64 + t as u64;
                    let start = s * STRIPE + (x >> 20) % 600;
                    let len = (((x >> 40) % 3000) + 1).min((s + 1) * STRIPE - start);
                    let d = pattern(x, len as usize);
                    img.write_at(&d, start).unwrap();
                    mine[start as usize..(start + len) as usize].copy_from_slice(&d);
                    let mut back = vec![0u8; STRIPE as usize];
                    img.read_at(&mut back, s * STRIPE).unwrap();
                    assert_eq!(
                        back[..],
                        mine[(s * STRIPE) as usize..((s + 1) * STRIPE) as usize],
                        "thread {t} op {i}"
                    );
                }
                mine
            })
        })
        .collect();
    let mut merged = base.clone();
    for (t, h) in handles.into_iter().enumerate() {
        let mine = h.join().unwrap();
        for s in (t as u64..stripes).step_by(THREADS) {
            let r = (s * STRIPE) as usize..((s + 1) * STRIPE) as usize;
            merged[r.clone()].copy_from_slice(&mine[r]);
        }
    }
    img.flush().unwrap();
    assert_eq!(read_all(img.as_ref()), merged);
}

#[test]
fn model_concurrent_writers_on_dynamic_image_match() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.vhd");
    create_path(&p, 2 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    concurrent(open_dyn(&p, false), vec![0; 2 << 20]);
    assert!(check_path(&p).unwrap().is_empty());
}

#[test]
fn model_concurrent_writers_on_differencing_image_match() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    create_path(&base, 2 << 20, &CreateKind::Dynamic { block_size: 65536 }).unwrap();
    let data = pattern(42, 2 << 20);
    {
        let img = open(&base, false);
        img.write_at(&data, 0).unwrap();
        img.flush().unwrap();
    }
    let child = tmp.path().join("child.vhd");
    snapshot_path(&child, &base, 65536).unwrap();
    concurrent(open_dyn(&child, false), data);
    assert!(check_path(&child).unwrap().is_empty());
}
