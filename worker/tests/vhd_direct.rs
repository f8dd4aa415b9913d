//! Direct mappings (`Image::map_direct`): what raw images, dynamic VHDs and
//! differencing chains hand out as plain file I/O, what they refuse, and
//! that a discard never frees a block a mapping points into.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use tapjail_ctl::files::{create_path, snapshot_path};
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::DEFAULT_BLOCK_SIZE;
use tapjail_worker::image::{Image, Mapping, Segment, SyncFiles, Target};

const MIB: u64 = 1 << 20;
const BS: u64 = DEFAULT_BLOCK_SIZE as u64;

/// Carry out a mapping the way a frontend would, on the layer files by
/// path (`files[i]` is direct file `i`): reads fill `buf`, writes store it.
fn perform(files: &[PathBuf], m: &Mapping, buf: &mut [u8]) {
    let mut at = 0usize;
    for s in m.segments() {
        let piece = &mut buf[at..at + s.len as usize];
        match s.target {
            Target::Zero => piece.fill(0),
            Target::File { file, offset } => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(m.is_write())
                    .open(&files[file])
                    .unwrap();
                if m.is_write() {
                    f.write_all_at(piece, offset).unwrap();
                } else {
                    f.read_exact_at(piece, offset).unwrap();
                }
            }
        }
        at += s.len as usize;
    }
    assert_eq!(at, buf.len(), "a mapping covers the whole request");
}

fn file_seg(file: usize, s: &Segment) -> bool {
    matches!(s.target, Target::File { file: f, .. } if f == file)
}

fn dynamic(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    create_path(&p, size, &CreateKind::dynamic()).unwrap();
    p
}

#[test]
fn raw_maps_every_in_range_request_to_its_own_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.img");
    std::fs::write(&p, vec![7u8; 64 * 1024]).unwrap();
    let img = RawImage::open(Box::new(std::fs::File::open(&p).unwrap()), "r", true).unwrap();
    let m = img.map_direct(4096, 8192, false).unwrap();
    assert_eq!(
        m.segments(),
        &[Segment {
            len: 8192,
            target: Target::File {
                file: 0,
                offset: 4096
            }
        }]
    );
    assert!(img.map_direct(4096, 8192, true).is_none(), "read-only");
    assert!(
        img.map_direct(60 * 1024, 8192, false).is_none(),
        "past the end"
    );
    assert_eq!(img.direct_files().len(), 1);
    assert_eq!(
        img.direct_sync(),
        Some(SyncFiles(0)),
        "read-only: nothing to sync"
    );
    img.direct_done(&m, true);
    assert_eq!(img.stats()[0].hits, [16, 0], "hits counted in sectors");
}

#[test]
fn dynamic_unallocated_reads_zero_and_writes_need_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "d.vhd", 8 * MIB);
    let img = open(&p, false);
    let m = img.map_direct(BS + 4096, 64 * 1024, false).unwrap();
    assert_eq!(
        m.segments(),
        &[Segment {
            len: 64 * 1024,
            target: Target::Zero
        }]
    );
    assert!(
        img.map_direct(BS + 4096, 4096, true).is_none(),
        "a write to an unallocated block allocates: not direct"
    );
    assert!(img.map_direct(100, 512, false).is_none(), "partial sector");
}

#[test]
fn dynamic_allocated_block_maps_in_place_for_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "d.vhd", 8 * MIB);
    let img = open(&p, false);
    let data = pattern(1, 8192);
    img.write_at(&data, BS + 4096).unwrap();
    let files = vec![p.clone()];

    let m = img.map_direct(BS + 4096, 8192, false).unwrap();
    assert_eq!(m.segments().len(), 1);
    let mut back = vec![0u8; 8192];
    perform(&files, &m, &mut back);
    assert_eq!(back, data);
    drop(m);

    // Overwrite in place through a write mapping; the engine sees it.
    let w = img.map_direct(BS, 4096, true).unwrap();
    let mut new = pattern(2, 4096);
    perform(&files, &w, &mut new);
    img.direct_done(&w, true);
    drop(w);
    let mut check = vec![0u8; 4096];
    img.read_at(&mut check, BS).unwrap();
    assert_eq!(check, new);
    assert_eq!(
        img.stats()[0].hits[1],
        16 + 8,
        "engine write + direct write"
    );

    // Across the end of the allocated block into an unallocated one.
    let r = img.map_direct(2 * BS - 4096, 8192, false).unwrap();
    assert!(file_seg(0, &r.segments()[0]));
    assert_eq!(r.segments()[1].target, Target::Zero);
    assert!(img.map_direct(2 * BS - 4096, 8192, true).is_none());
    assert_eq!(
        img.direct_sync(),
        None,
        "the batmap changed: a real flush first"
    );
    img.flush().unwrap();
    assert_eq!(img.direct_sync(), Some(SyncFiles(1)));
}

/// Offset of the `tdbatmap` header in a file.
fn find(bytes: &[u8], what: &[u8]) -> Option<usize> {
    bytes.windows(what.len()).position(|w| w == what)
}

#[test]
fn dynamic_partially_bitmapped_block_maps_present_sectors_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "d.vhd", 8 * MIB);
    let img = open(&p, false);
    img.write_at(&pattern(3, 4096), 0).unwrap();
    let Target::File { offset: data, .. } =
        img.map_direct(0, 512, false).unwrap().segments()[0].target
    else {
        panic!("allocated")
    };
    drop(img);
    // As another tool may leave it: only sectors 0..8 marked present, and
    // no valid batmap to say the block is full.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut bitmap = vec![0u8; 512];
    bitmap[0] = 0xff;
    f.write_all_at(&bitmap, data - 512).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let bm = find(&bytes, b"tdbatmap").expect("batmap header") as u64;
    f.write_all_at(&[0xde, 0xad], bm + 8 + 8 + 4 + 4).unwrap(); // checksum
    drop(f);

    let img = open(&p, false);
    assert!(
        img.map_direct(0, 4096, false).is_none(),
        "bitmap not cached yet: the engine reads it first"
    );
    let mut b = vec![0u8; 8192];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[..4096], &pattern(3, 4096)[..]);
    let m = img.map_direct(0, 8192, false).unwrap();
    assert_eq!(
        m.segments(),
        &[
            Segment {
                len: 4096,
                target: Target::File {
                    file: 0,
                    offset: data
                }
            },
            Segment {
                len: 4096,
                target: Target::Zero
            }
        ]
    );
    assert!(img.map_direct(0, 4096, true).is_some(), "present sectors");
    assert!(
        img.map_direct(0, 8192, true).is_none(),
        "clear sectors need their bits set: the engine's job"
    );
}

#[test]
fn differencing_reads_map_through_the_chain_and_writes_only_to_present_leaf_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let base = dynamic(dir.path(), "base.vhd", 8 * MIB);
    {
        let b = open(&base, false);
        b.write_at(&pattern(4, 64 * 1024), 0).unwrap();
    }
    let child = dir.path().join("child.vhd");
    snapshot_path(&child, &base, DEFAULT_BLOCK_SIZE).unwrap();
    let img = open(&child, false);
    let files = vec![child.clone(), base.clone()];
    assert_eq!(img.direct_files().len(), 2);

    // The parent's batmap says its block 0 is full: a hint the engine
    // checks against the block's bitmap on first use, which the direct
    // path (no I/O) leaves to the engine.
    assert!(
        img.map_direct(0, 8192, false).is_none(),
        "unchecked batmap bit"
    );
    img.read_at(&mut [0u8; 512], 0).unwrap();
    let hits_before = img.stats()[1].hits[0];
    // Unallocated in the leaf: the parent's data, from the parent's file.
    let m = img.map_direct(0, 8192, false).unwrap();
    assert_eq!(m.segments().len(), 1);
    assert!(file_seg(1, &m.segments()[0]), "{:?}", m.segments());
    let mut b = vec![0u8; 8192];
    perform(&files, &m, &mut b);
    assert_eq!(b, pattern(4, 64 * 1024)[..8192]);
    img.direct_done(&m, true);
    assert_eq!(
        img.stats()[1].hits[0] - hits_before,
        16,
        "counted on the parent"
    );
    assert!(
        img.map_direct(0, 4096, true).is_none(),
        "data in the parent: a write must allocate in the leaf"
    );
    // Beyond the parent's data: the parent's unallocated space reads zero.
    let z = img.map_direct(4 * MIB, 4096, false).unwrap();
    assert_eq!(z.segments()[0].target, Target::Zero);

    // Sectors 0..8 written in the leaf; 8..16 still the parent's.
    img.write_at(&pattern(5, 4096), 0).unwrap();
    let m = img.map_direct(0, 8192, false).unwrap();
    assert!(file_seg(0, &m.segments()[0]) && m.segments()[0].len == 4096);
    assert!(file_seg(1, &m.segments()[1]) && m.segments()[1].len == 4096);
    perform(&files, &m, &mut b);
    assert_eq!(&b[..4096], &pattern(5, 4096)[..]);
    assert_eq!(&b[4096..], &pattern(4, 8192)[4096..]);
    assert!(
        img.map_direct(0, 4096, true).is_some(),
        "present in the leaf"
    );
    assert!(
        img.map_direct(0, 8192, true).is_none(),
        "half of it is still in the parent"
    );
    drop(img);

    // Reopened: the leaf's bitmap is not cached, so no guessing.
    let img = open(&child, false);
    assert!(img.map_direct(0, 4096, false).is_none());
    assert!(img.map_direct(0, 4096, true).is_none());
}

#[test]
fn discard_leaves_a_block_under_a_mapping_allocated_and_zeroes_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "d.vhd", 8 * MIB);
    let img = open(&p, false);
    img.write_at(&pattern(6, BS as usize), BS).unwrap();
    let files = vec![p.clone()];
    let w = img.map_direct(BS + 8192, 4096, true).unwrap();
    img.discard(BS, BS).unwrap();
    assert!(img.leaf().block_allocated(1), "pinned: not deallocated");
    let mut z = vec![1u8; 8192];
    img.read_at(&mut z, BS).unwrap();
    assert!(z.iter().all(|&x| x == 0), "but zeroed");
    // The in-flight write still lands in block 1.
    let mut d = pattern(7, 4096);
    perform(&files, &w, &mut d);
    drop(w);
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, BS + 8192).unwrap();
    assert_eq!(back, d);
    // With no mapping left, a discard frees the block.
    img.discard(BS, BS).unwrap();
    assert!(!img.leaf().block_allocated(1));
    img.read_at(&mut back, BS + 8192).unwrap();
    assert!(back.iter().all(|&x| x == 0));
}

#[test]
fn concurrent_discards_never_free_a_block_while_a_mapping_points_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "d.vhd", 8 * MIB);
    let img = Arc::new(open(&p, false));
    img.write_at(&pattern(8, 4096), BS).unwrap();
    // Both sides run until each has done enough rounds against the other
    // (counted, not timed: a loaded machine only makes it slower).
    const ROUNDS: u32 = 20;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU32::new(0));
    let discarder = {
        let (img, stop, rounds) = (img.clone(), stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                img.discard(BS, BS).unwrap();
                img.write_at(&pattern(9, 4096), BS).unwrap(); // reallocates elsewhere
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut held = 0u32;
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while held < ROUNDS || rounds.load(Ordering::Relaxed) < ROUNDS {
        assert!(
            std::time::Instant::now() < limit,
            "no progress: {held} mappings held, {} discards",
            rounds.load(Ordering::Relaxed)
        );
        let Some(m) = img.map_direct(BS, 4096, true) else {
            continue; // unallocated right now
        };
        let Target::File { offset, .. } = m.segments()[0].target else {
            panic!("write mappings point into files");
        };
        // While the mapping lives, block 1 stays where it pointed.
        for _ in 0..20 {
            let (_, now) = img.leaf().map(BS, 4096).unwrap();
            assert_eq!(now, Some(offset), "block freed or moved under a mapping");
            std::thread::yield_now();
        }
        held += 1;
        drop(m);
    }
    stop.store(true, Ordering::Relaxed);
    discarder.join().unwrap();
}
