//! The merge against a guest that writes while it copies: whatever the
//! interleaving, the disk (and afterwards the merged file alone) reads
//! as a model that applies the guest's writes in order.

use super::Job;
use crate::disk::{Disk, IoKind};
use crate::image::vhd::create::{create, CreateKind, ParentSpec};
use crate::image::vhd::{self, VhdImage, VhdLayer, VhdOptions};
use crate::image::{Backing, Image, ImageError, ParentLocator, ParentOpener};
use crate::io::CacheMode;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tapjail_common::coalesce::{CoalesceState, Direction};

const SIZE: u64 = 24 << 20;
const BS: u32 = 2 << 20;

struct NoParents;

impl ParentOpener for NoParents {
    fn open_parent(
        &mut self,
        child: &str,
        _: &[ParentLocator],
        _: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        Err(ImageError::InvalidArgument(format!(
            "{child}: no parents here"
        )))
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn rw(path: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// A base with data in its first half, a child with data over a stretch
/// of it and beyond; returns the paths, the served chain and the model.
fn chain(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, VhdImage, Vec<u8>) {
    let (bp, cp) = (dir.join("base.vhd"), dir.join("child.vhd"));
    let mut model = vec![0u8; SIZE as usize];
    let base = File::create_new(&bp).unwrap();
    create(&base, SIZE, &CreateKind::Dynamic { block_size: BS }).unwrap();
    let b = VhdImage::from_layers(vec![VhdLayer::open(
        Box::new(rw(&bp)),
        "base",
        false,
        VhdOptions::default(),
    )
    .unwrap()])
    .unwrap();
    let data: Vec<u8> = (0..12 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
    b.write_at(&data, 0).unwrap();
    b.flush().unwrap();
    model[..data.len()].copy_from_slice(&data);
    let uuid = b.leaf().uuid();
    drop(b);
    let child = File::create_new(&cp).unwrap();
    let parent = ParentSpec {
        uuid,
        timestamp: 0,
        name: "base.vhd".into(),
        locators: Vec::new(),
    };
    create(
        &child,
        SIZE,
        &CreateKind::Differencing {
            block_size: BS,
            parent,
        },
    )
    .unwrap();
    let layers = vec![
        VhdLayer::open(Box::new(rw(&cp)), "child", false, VhdOptions::default()).unwrap(),
        VhdLayer::open(
            Box::new(File::open(&bp).unwrap()),
            "base",
            true,
            VhdOptions::default(),
        )
        .unwrap(),
    ];
    let img = VhdImage::from_layers(layers).unwrap();
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 241) as u8 | 2).collect();
    img.write_at(&data, 8 << 20).unwrap();
    model[8 << 20..16 << 20].copy_from_slice(&data);
    (bp, cp, img, model)
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn merge_while_writing(direction: Direction) {
    let dir = tempfile::tempdir().unwrap();
    let (bp, cp, img, mut model) = chain(dir.path());
    let disk = Disk::new(Arc::new(img));
    let written = match direction {
        Direction::Stream => &cp,
        Direction::Commit => &bp,
    };
    let fd: OwnedFd = rw(written).into();
    let mut job = Job::start(
        &disk,
        direction,
        "written",
        u64::MAX / 4,
        fd,
        CacheMode::Buffered,
        &mut NoParents,
    )
    .expect("start");
    // The guest: writes of every shape all over the disk until the copy
    // is done (and at least 200 of them), the model following in order.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut n = 0u32;
    while n < 200 || job.progress.state() == CoalesceState::Copying {
        let len = 1 + rng.next() % (300 << 10);
        let off = rng.next() % (SIZE - len);
        let byte = (rng.next() % 255) as u8 + 1;
        let data = vec![byte; len as usize];
        disk.io(IoKind::Write, len, |i| i.write_at(&data, off))
            .unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        n += 1;
    }
    assert_eq!(
        job.progress.state(),
        CoalesceState::Copied,
        "{:?}",
        job.stats()
    );
    job.hold().expect("hold");
    job.switch(|i| i).expect("switch");
    let served = disk.io(IoKind::Read, 0, |i| Ok(read_all(i))).unwrap();
    assert!(
        served == model,
        "{direction}: the disk differs from the model"
    );
    drop(job);
    drop(disk);
    // The merged file alone (no parent asked for) holds the model.
    let alone = vhd::open(
        Box::new(File::open(written).unwrap()),
        "alone",
        true,
        &mut NoParents,
        VhdOptions::default(),
    )
    .expect("the merged file opens alone");
    assert!(
        read_all(&alone) == model,
        "{direction}: the merged file differs"
    );
}

#[test]
fn stream_under_racing_writes_keeps_every_guest_write() {
    merge_while_writing(Direction::Stream);
}

#[test]
fn commit_under_racing_writes_keeps_every_guest_write() {
    merge_while_writing(Direction::Commit);
}

/// An image that logs the writes reaching it.
#[derive(Debug)]
struct Logged {
    inner: crate::image::raw::RawImage,
    log: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

/// A stream step holds its chunk against guest writes: a write to the
/// chunk reaches the image only after the step let go (writes elsewhere
/// are not held). The writer is given time to overtake; with the guard
/// missing it does, with the guard it cannot.
#[test]
fn a_guest_write_waits_for_the_stream_step_holding_its_chunk() {
    use super::guard::{Guards, Merging, CHUNK};
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let guards = Arc::new(Guards::new(4 * CHUNK));
    let f = tempfile::tempfile().unwrap();
    f.set_len(4 * CHUNK).unwrap();
    let m = Merging {
        inner: Arc::new(LoggedImage(Logged {
            inner: crate::image::raw::RawImage::open(Box::new(f), "m", false).unwrap(),
            log: log.clone(),
        })),
        guards: guards.clone(),
    };
    let held = guards.exclusive(1);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let m = &m;
        let w = s.spawn(move || {
            tx.send(()).unwrap();
            m.write_at(b"guest", CHUNK + 7).unwrap();
        });
        // Elsewhere: not held.
        m.write_at(b"other", 3 * CHUNK).unwrap();
        rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        log.lock().unwrap().push("step done");
        drop(held);
        w.join().unwrap();
    });
    assert_eq!(*log.lock().unwrap(), ["write", "step done", "write"]);
    assert!(guards.take_dirty(1) && guards.take_dirty(3) && !guards.take_dirty(0));
}

#[derive(Debug)]
struct LoggedImage(Logged);

impl Image for LoggedImage {
    fn virtual_size(&self) -> u64 {
        self.0.inner.virtual_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.0.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.0.log.lock().unwrap().push("write");
        self.0.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), ImageError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.0.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.0.inner.write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<crate::image::Extent, ImageError> {
        self.0.inner.block_status(offset, len)
    }
    fn stats(&self) -> Vec<crate::image::LayerStats> {
        Vec::new()
    }
}
