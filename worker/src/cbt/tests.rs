//! The engine against an in-memory log file, and its crash states: every
//! point a power cut could stop the log's writes (each write durable once
//! it returned, the one in progress torn at any 512-byte sector), checked
//! against the data writes acknowledged before that point.

use super::log::{self, BLOCK_SIZE, HEADER_LEN};
use super::*;
use crate::image::{Extent, Image, ImageError, LayerStats};
use std::sync::Mutex;

/// What happened, in order, across the log file and the disk.
#[derive(Debug, Clone)]
enum Ev {
    LogWrite { off: u64, data: Vec<u8> },
    Ack { off: u64, len: u64 },
}

#[derive(Debug, Clone, Default)]
struct World(Arc<Mutex<(Vec<u8>, Vec<Ev>)>>);

impl World {
    fn events(&self) -> Vec<Ev> {
        self.0.lock().unwrap().1.clone()
    }
    fn file(&self) -> Vec<u8> {
        self.0.lock().unwrap().0.clone()
    }
}

#[derive(Debug)]
struct MemStore {
    world: World,
    fail: Arc<AtomicBool>,
}

impl LogStore for MemStore {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail.load(SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut w = self.world.0.lock().unwrap();
        let off = usize::try_from(offset).unwrap();
        if w.0.len() < off + buf.len() {
            w.0.resize(off + buf.len(), 0);
        }
        w.0[off..off + buf.len()].copy_from_slice(buf);
        w.1.push(Ev::LogWrite {
            off: offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
}

/// A disk that only records which writes it acknowledged.
#[derive(Debug)]
struct AckDisk {
    size: u64,
    world: World,
}

impl Image for AckDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<(), ImageError> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.world.0.lock().unwrap().1.push(Ev::Ack {
            off: offset,
            len: buf.len() as u64,
        });
        Ok(())
    }
    fn flush(&self) -> Result<(), ImageError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.world
            .0
            .lock()
            .unwrap()
            .1
            .push(Ev::Ack { off: offset, len });
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), ImageError> {
        self.discard(offset, len)
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<Extent, ImageError> {
        Ok(Extent {
            len,
            allocated: true,
            zero: false,
        })
    }
    fn stats(&self) -> Vec<LayerStats> {
        Vec::new()
    }
}

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

const SIZE: u64 = 300 * BLOCK_SIZE + 4096; // not a multiple of 64 blocks

fn tracked(world: &World) -> (Arc<Tracker>, Arc<dyn Image>, Arc<AtomicBool>) {
    let fail = Arc::new(AtomicBool::new(false));
    let store = MemStore {
        world: world.clone(),
        fail: fail.clone(),
    };
    let map = Bitmap::create("b", SIZE, Box::new(store)).unwrap();
    let tracker = Arc::new(Tracker::default());
    tracker.add(map).unwrap();
    let disk = Arc::new(AckDisk {
        size: SIZE,
        world: world.clone(),
    });
    (tracker.clone(), Tracked::wrap(disk, tracker), fail)
}

/// A tiny deterministic generator (no timing, no OS randomness).
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn workload(img: &dyn Image, seed: u64, n: usize) {
    let mut s = seed;
    for _ in 0..n {
        let off = rng(&mut s) % SIZE;
        let len = (rng(&mut s) % (3 * BLOCK_SIZE)).min(SIZE - off).max(1);
        match rng(&mut s) % 4 {
            0 => img.discard(off, len).unwrap(),
            1 => img.write_zeroes(off, len, true).unwrap(),
            _ => img
                .write_at(&vec![1; usize::try_from(len).unwrap()], off)
                .unwrap(),
        }
    }
}

fn apply(file: &mut Vec<u8>, off: u64, data: &[u8]) {
    let off = usize::try_from(off).unwrap();
    if file.len() < off + data.len() {
        file.resize(off + data.len(), 0);
    }
    file[off..off + data.len()].copy_from_slice(data);
}

/// Every crash state of `events`: returns the first violation found, as
/// (crash point, block that an acknowledged write touched but the file
/// does not mark).
fn first_violation(events: &[Ev]) -> Option<(usize, u64)> {
    for k in 0..=events.len() {
        let mut base = Vec::new();
        let mut acked = Vec::new();
        for ev in &events[..k] {
            match ev {
                Ev::LogWrite { off, data } => apply(&mut base, *off, data),
                Ev::Ack { off, len } => acked.push((*off, *len)),
            }
        }
        // The write in progress at the cut, torn: any subset of its sectors.
        let mut states = vec![base.clone()];
        if let Some(Ev::LogWrite { off, data }) = events.get(k) {
            let sectors = data.len().div_ceil(512);
            for keep in 0..sectors.min(8) {
                let mut s = base.clone();
                let lo = keep * 512;
                apply(
                    &mut s,
                    *off + lo as u64,
                    &data[lo..(lo + 512).min(data.len())],
                );
                states.push(s);
            }
        }
        for state in states {
            if state.len() < HEADER_LEN {
                if !acked.is_empty() {
                    return Some((k, acked[0].0 / BLOCK_SIZE));
                }
                continue;
            }
            let (_, bits) = log::parse(&state, SIZE).expect("every crash state parses");
            for &(off, len) in &acked {
                for b in off / BLOCK_SIZE..=(off + len - 1) / BLOCK_SIZE {
                    if !log::test(bits, b) {
                        return Some((k, b));
                    }
                }
            }
        }
    }
    None
}

#[test]
fn every_crash_state_marks_every_acknowledged_write() {
    for seed in 1..6 {
        let world = World::default();
        let (tracker, img, _) = tracked(&world);
        workload(img.as_ref(), seed * 7919, 60);
        tracker.get("b").unwrap().checkpoint().unwrap();
        workload(img.as_ref(), seed * 104_729, 40);
        let events = world.events();
        // Only count acks after the checkpoint's clearing: before it the
        // bits were meant to go.
        let cut = events
            .iter()
            .rposition(|e| matches!(e, Ev::LogWrite { data, .. } if data.iter().all(|&b| b == 0) && data.len() > 8))
            .unwrap();
        let after: Vec<Ev> = events[..=cut]
            .iter()
            .filter(|e| matches!(e, Ev::LogWrite { .. }))
            .cloned()
            .chain(events[cut + 1..].iter().cloned())
            .collect();
        assert_eq!(
            first_violation(&events[..cut]),
            None,
            "seed {seed}, before checkpoint"
        );
        assert_eq!(
            first_violation(&after),
            None,
            "seed {seed}, after checkpoint"
        );
    }
}

#[test]
fn crash_checker_catches_a_write_acknowledged_before_its_bit() {
    // The order a write-behind tracker would produce: ack, then bit.
    let mut file = log::fresh(SIZE);
    file[HEADER_LEN] = 0b10;
    let events = vec![
        Ev::LogWrite {
            off: 0,
            data: log::fresh(SIZE),
        },
        Ev::Ack {
            off: BLOCK_SIZE,
            len: 10,
        },
        Ev::LogWrite {
            off: HEADER_LEN as u64,
            data: vec![0b10],
        },
    ];
    assert_eq!(first_violation(&events), Some((2, 1)));
}

#[test]
fn marked_blocks_are_in_the_file_and_reload_after_restart() {
    let world = World::default();
    let (tracker, img, _) = tracked(&world);
    img.write_at(&[1; 10], 5 * BLOCK_SIZE - 5).unwrap(); // blocks 4 and 5
    img.write_zeroes(299 * BLOCK_SIZE, BLOCK_SIZE + 4096, false)
        .unwrap(); // 299, 300 (the partial last block)
    let map = tracker.get("b").unwrap();
    assert_eq!(map.dirty_blocks(), 4);
    let file = world.file();
    let (h, bits) = log::parse(&file, SIZE).unwrap();
    assert!(h.consistent);
    let set: Vec<u64> = (0..log::blocks(SIZE))
        .filter(|&b| log::test(bits, b))
        .collect();
    assert_eq!(set, vec![4, 5, 299, 300]);
    // A respawned worker takes the same file over.
    let (again, _) = Bitmap::load(
        "b",
        Origin::Named,
        SIZE,
        &file,
        Box::new(MemStore {
            world: World::default(),
            fail: Arc::default(),
        }),
    )
    .unwrap();
    assert_eq!(again.dirty_blocks(), 4);
    assert_eq!(again.extent(0, SIZE), Some((4 * BLOCK_SIZE, false)));
    assert_eq!(
        again.extent(4 * BLOCK_SIZE, SIZE),
        Some((2 * BLOCK_SIZE, true))
    );
    assert_eq!(
        again.extent(299 * BLOCK_SIZE, SIZE),
        Some((BLOCK_SIZE + 4096, true))
    );
    assert_eq!(again.extent(SIZE, 1), None);
}

#[test]
fn a_failed_log_write_fails_the_data_write_and_is_retried() {
    let world = World::default();
    let (tracker, img, fail) = tracked(&world);
    fail.store(true, SeqCst);
    assert!(img.write_at(&[1; 512], 0).is_err());
    assert!(
        !world.events().iter().any(|e| matches!(e, Ev::Ack { .. })),
        "the data must not be written when its bit is not on disk"
    );
    fail.store(false, SeqCst);
    // Same block: its bit is set in memory but not on disk, so it is
    // written now rather than skipped.
    img.write_at(&[1; 512], 512).unwrap();
    let file = world.file();
    let (_, bits) = log::parse(&file, SIZE).unwrap();
    assert!(log::test(bits, 0));
    assert!(tracker.covered(0, 1024));
}

#[test]
fn marking_a_marked_block_writes_nothing_and_direct_writes_wait_for_the_bit() {
    let world = World::default();
    let (_tracker, img, _) = tracked(&world);
    img.write_at(&[1; 512], 0).unwrap();
    let n = world.events().len();
    img.write_at(&[1; 512], 4096).unwrap();
    let log_writes = world.events()[n..]
        .iter()
        .filter(|e| matches!(e, Ev::LogWrite { .. }))
        .count();
    assert_eq!(log_writes, 0);
}

#[test]
fn concurrent_writers_all_reach_the_file() {
    let world = World::default();
    let (tracker, img, _) = tracked(&world);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let img = img.clone();
            s.spawn(move || {
                for i in 0..30u64 {
                    let b = (t * 37 + i * 11) % 300;
                    img.write_at(&[1; 512], b * BLOCK_SIZE).unwrap();
                }
            });
        }
    });
    let file = world.file();
    let (_, bits) = log::parse(&file, SIZE).unwrap();
    for t in 0..8u64 {
        for i in 0..30u64 {
            assert!(log::test(bits, (t * 37 + i * 11) % 300));
        }
    }
    assert_eq!(
        tracker.get("b").unwrap().dirty_blocks(),
        (0..300).filter(|&b| log::test(bits, b)).count() as u64
    );
}

#[test]
fn names_are_checked_and_unique() {
    assert!(valid_name("backup-1.daily_x"));
    for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    let world = World::default();
    let (tracker, _, _) = tracked(&world);
    let dup = Bitmap::create(
        "b",
        SIZE,
        Box::new(MemStore {
            world: World::default(),
            fail: Arc::default(),
        }),
    )
    .unwrap();
    assert!(matches!(tracker.add(dup), Err(CbtError::Exists(_))));
    assert!(matches!(tracker.remove("nope"), Err(CbtError::Missing(_))));
}
