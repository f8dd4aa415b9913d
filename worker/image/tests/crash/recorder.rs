//! The recorder: in-memory image files that log every write, length
//! change and sync the engine sends them, in the order it sends them.
//!
//! Files are shared by one [`World`], whose log interleaves all of them,
//! because a crash cuts every file at the same instant. Reads are served
//! from the current (volatile) contents, as the page cache would.
//! `direct_fd` hands out a fake fd (`FAKE_FD_BASE + id`, never used as a
//! real fd) so that a chain offers direct mappings exactly as it does to
//! the worker, and the harness's own ublk-like path can write through them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use tapjail_image::{Backing, DirectFile};

/// First fake fd handed out by [`Handle::direct_fd`].
pub const FAKE_FD_BASE: i32 = 10_000;

/// One recorded file operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// `durable`: written with FUA (`RWF_DSYNC`): on disk once it returned.
    Write {
        file: usize,
        off: u64,
        data: Arc<[u8]>,
        durable: bool,
    },
    SetLen {
        file: usize,
        len: u64,
    },
    /// fdatasync of one file: everything it was sent before is durable.
    Sync {
        file: usize,
    },
}

impl Op {
    pub fn file(&self) -> usize {
        match self {
            Op::Write { file, .. } | Op::SetLen { file, .. } | Op::Sync { file } => *file,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    files: Vec<Vec<u8>>,
    /// Contents when recording began: durable by definition.
    bases: Vec<Vec<u8>>,
    log: Vec<Op>,
    recording: bool,
}

/// A set of files and the log of what was done to them.
#[derive(Debug, Default, Clone)]
pub struct World(Arc<Mutex<Inner>>);

/// One file of a [`World`], usable as an engine [`Backing`].
#[derive(Debug, Clone)]
pub struct Handle {
    world: World,
    pub id: usize,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, empty file.
    pub fn new_file(&self) -> Handle {
        let mut w = self.lock();
        w.files.push(Vec::new());
        w.bases.push(Vec::new());
        Handle {
            world: self.clone(),
            id: w.files.len() - 1,
        }
    }

    pub fn handle(&self, id: usize) -> Handle {
        Handle {
            world: self.clone(),
            id,
        }
    }

    /// Start recording: what the files hold now is durable.
    pub fn begin(&self) {
        let mut w = self.lock();
        w.bases = w.files.clone();
        w.log.clear();
        w.recording = true;
    }

    /// Ops recorded so far: a crash point is a position in this log.
    pub fn pos(&self) -> usize {
        self.lock().log.len()
    }

    /// Stop recording; returns the durable bases and the log.
    pub fn finish(&self) -> (Vec<Vec<u8>>, Vec<Op>) {
        let mut w = self.lock();
        w.recording = false;
        (w.bases.clone(), std::mem::take(&mut w.log))
    }

    /// A write that bypasses the engine (the ublk direct path's pwrite).
    pub fn direct_write(&self, id: usize, data: &[u8], off: u64, durable: bool) {
        let mut w = self.lock();
        write_into(&mut w.files[id], data, off);
        if w.recording {
            w.log.push(Op::Write {
                file: id,
                off,
                data: data.into(),
                durable,
            });
        }
    }

    /// The ublk direct path's fdatasync of one file.
    pub fn direct_sync(&self, id: usize) {
        let mut w = self.lock();
        if w.recording {
            w.log.push(Op::Sync { file: id });
        }
    }
}

pub fn write_into(file: &mut Vec<u8>, data: &[u8], off: u64) {
    let off = off as usize;
    if file.len() < off + data.len() {
        file.resize(off + data.len(), 0);
    }
    file[off..off + data.len()].copy_from_slice(data);
}

impl Backing for Handle {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let w = self.world.lock();
        let f = &w.files[self.id];
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= f.len() as u64 => {
                buf.copy_from_slice(&f[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.world.direct_write(self.id, buf, offset, false);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.world.direct_sync(self.id);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.world.lock().files[self.id].len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut w = self.world.lock();
        w.files[self.id].resize(len as usize, 0);
        if w.recording {
            w.log.push(Op::SetLen { file: self.id, len });
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Recorded as the zeroes it leaves, inside the file only.
        let flen = self.world.lock().files[self.id].len() as u64;
        let end = offset.saturating_add(len).min(flen);
        if end > offset {
            let zero = vec![0u8; (end - offset) as usize];
            self.world.direct_write(self.id, &zero, offset, false);
        }
        Ok(())
    }

    fn direct_fd(&self) -> Option<DirectFile> {
        Some(DirectFile {
            fd: FAKE_FD_BASE + self.id as i32,
            o_direct: false,
        })
    }
}

/// A plain in-memory file for opening a crash state (nothing recorded).
#[derive(Debug)]
pub struct MemFile(pub Mutex<Vec<u8>>);

impl MemFile {
    pub fn new(data: Vec<u8>) -> MemFile {
        MemFile(Mutex::new(data))
    }
    pub fn take(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Backing for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= f.len() as u64 => {
                buf.copy_from_slice(&f[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_into(
            &mut self.0.lock().unwrap_or_else(|p| p.into_inner()),
            buf,
            offset,
        );
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let end = (offset.saturating_add(len) as usize).min(f.len());
        if end > offset as usize {
            f[offset as usize..end].fill(0);
        }
        Ok(())
    }
}

/// Shared so that a chain's parents can be handed out more than once.
#[derive(Debug, Clone)]
pub struct SharedMem(pub Arc<MemFile>);

impl Backing for SharedMem {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}
