//! The guest: issues writes and flushes to an opened chain the way the
//! worker's frontends do, and records them in a [`View`].
//!
//! `Path::Ublk` is the ublk queue's order: a write the image maps directly
//! (`map_direct`) goes straight to the file (FUA as `RWF_DSYNC`), anything
//! else through `write_at` (then `flush` for FUA); a flush fdatasyncs the
//! files `direct_sync` names, or calls `flush`. `Path::Sync` is the NBD
//! and FUSE frontends' order: `write_at`, `flush`.

use crate::model::{pattern, GuestWrite, View, SECTOR};
use crate::recorder::{World, FAKE_FD_BASE};
use std::sync::atomic::{AtomicUsize, Ordering};
use tapjail_image::vhd::VhdImage;
use tapjail_image::{Image, Target};

/// Writes that went the direct way and flushes that were plain data
/// syncs, in this process: the harness's own test checks that the
/// worker's fast path really is among what it records.
pub static DIRECT_WRITES: AtomicUsize = AtomicUsize::new(0);
pub static DIRECT_SYNCS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Ublk,
    Sync,
}

pub struct Guest<'a> {
    pub world: &'a World,
    pub img: &'a VhdImage,
    pub view: &'a mut View,
    pub ids: &'a mut u32,
    pub path: Path,
}

impl<'a> Guest<'a> {
    pub fn new(
        world: &'a World,
        img: &'a VhdImage,
        view: &'a mut View,
        ids: &'a mut u32,
        path: Path,
    ) -> Guest<'a> {
        Guest {
            world,
            img,
            view,
            ids,
            path,
        }
    }

    /// Write `count` sectors from `first`, each with a fresh pattern.
    pub fn write(&mut self, first: u64, count: u64, fua: bool) {
        *self.ids += 1;
        let id = *self.ids;
        let mut buf = vec![0u8; count as usize * SECTOR];
        for i in 0..count {
            pattern(id, first + i, &mut buf[i as usize * SECTOR..][..SECTOR]);
        }
        let issue = self.world.pos();
        self.submit(&buf, first * SECTOR as u64, fua);
        self.view.writes.push(GuestWrite {
            first,
            ids: vec![id; count as usize],
            issue,
            ack: self.world.pos(),
            fua,
        });
    }

    /// Zero sectors through `write_zeroes` (deallocating where allowed).
    pub fn zero(&mut self, first: u64, count: u64, may_unmap: bool) {
        let issue = self.world.pos();
        self.img
            .write_zeroes(first * SECTOR as u64, count * SECTOR as u64, may_unmap)
            .expect("write_zeroes");
        self.view.writes.push(GuestWrite {
            first,
            ids: vec![0; count as usize],
            issue,
            ack: self.world.pos(),
            fua: false,
        });
    }

    fn submit(&self, buf: &[u8], offset: u64, fua: bool) {
        if self.path == Path::Ublk {
            if let Some(m) = self.img.map_direct(offset, buf.len() as u64, true) {
                let files = self.img.direct_files();
                let mut at = 0usize;
                for seg in m.segments() {
                    let n = seg.len as usize;
                    match seg.target {
                        Target::File { file, offset } => {
                            let id = (files[file].fd - FAKE_FD_BASE) as usize;
                            self.world.direct_write(id, &buf[at..at + n], offset, fua);
                        }
                        Target::Zero => panic!("a write mapping with a zero segment"),
                    }
                    at += n;
                }
                self.img.direct_done(&m, true);
                DIRECT_WRITES.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.img.write_at(buf, offset).expect("write_at");
        if fua {
            self.img.flush().expect("flush");
        }
    }

    pub fn flush(&mut self) {
        let start = self.world.pos();
        match (self.path, self.img.direct_sync()) {
            (Path::Ublk, Some(sync)) => {
                DIRECT_SYNCS.fetch_add(1, Ordering::Relaxed);
                let files = self.img.direct_files();
                for i in sync.iter() {
                    self.world
                        .direct_sync((files[i].fd - FAKE_FD_BASE) as usize);
                }
            }
            _ => self.img.flush().expect("flush"),
        }
        self.view.flushes.push((start, self.world.pos()));
    }
}
