//! The fuzz harness bodies, shared by the libFuzzer targets and the stable
//! replay tests: image files (`open_read`, `write_repair`), FUSE requests
//! (`fuse_request`), a hostile NBD client ([`nbd`]), a hostile NBD
//! secondary against the mirror client ([`mirror`]), control frames
//! ([`frames`]) and the policy file ([`policy`]).

use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use tapjail_image::vhd::{check, repair, VhdImage, VhdLayer, VhdOptions};
use tapjail_image::{Backing, Image};

pub mod frames;
pub mod fuse;
pub mod mirror;
pub mod nbd;
pub mod policy;

pub use frames::control_frames;
pub use mirror::mirror_server;
pub use nbd::nbd_client;
pub use policy::policy_toml;

/// An in-memory file holding the fuzz input, so that nothing reaches the
/// disk. Read-only unless made with [`MemFile::writable`] (then it grows
/// up to [`MEM_FILE_MAX`], a full disk beyond).
#[derive(Debug)]
pub struct MemFile(Mutex<Vec<u8>>, bool);

/// Largest a writable [`MemFile`] grows.
pub const MEM_FILE_MAX: u64 = 64 << 20;

impl MemFile {
    pub fn new(b: &[u8]) -> Self {
        MemFile(Mutex::new(b.to_vec()), false)
    }
    pub fn writable(b: &[u8]) -> Self {
        MemFile(Mutex::new(b.to_vec()), true)
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Backing for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = d.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.1 {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= MEM_FILE_MAX)
            .ok_or_else(|| io::Error::from_raw_os_error(28))?;
        let mut d = self.0.lock().unwrap();
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.1 {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        if len > MEM_FILE_MAX {
            return Err(io::Error::from_raw_os_error(28));
        }
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Open, read the start, the end and a few places, ask block status and
/// run `check`. Whether it opened as a VHD (the replay counts these).
pub fn open_read(data: &[u8]) -> bool {
    let _ = check::check(&MemFile::new(data));
    let Ok(layer) = VhdLayer::open(
        Box::new(MemFile::new(data)),
        "fuzz",
        true,
        VhdOptions::default(),
    ) else {
        return false;
    };
    let Ok(img) = VhdImage::from_layers(vec![layer]) else {
        return false;
    };
    let size = img.virtual_size();
    let mut buf = vec![0u8; 65536];
    for off in [0, size / 3, size / 2 + 511, size.saturating_sub(65536)] {
        let len = (buf.len() as u64).min(size - off.min(size)) as usize;
        let _ = img.read_at(&mut buf[..len], off.min(size));
    }
    if size > 0 {
        let _ = img.block_status(0, size);
    }
    let _ = img.leaf().parent_locators();
    true
}

/// The FUSE frontend's request path: parse one `/dev/fuse` message and, if
/// it parses, answer it from the one-file filesystem over a small
/// in-memory disk (writes fail, as the fuzz input is read-only). Anything
/// but a panic is fine. Whether the message parsed.
pub fn fuse_request(data: &[u8]) -> bool {
    use tapjail_image::raw::RawImage;
    use tapjail_worker::disk::Disk;
    use tapjail_worker::frontend::fuse::fs::{OneFileFs, Outcome};
    use tapjail_worker::frontend::fuse::request;

    let Ok(req) = request::parse(data) else {
        return false;
    };
    let img = RawImage::open(Box::new(MemFile::new(&[0u8; 65536])), "fuzz", false)
        .expect("a raw image over memory opens");
    let fs = OneFileFs::new(Disk::new(Arc::new(img)), "disk");
    if let Outcome::Read(r) = fs.handle(&req) {
        let mut buf = vec![0u8; request::MAX_READ];
        let _ = fs.read(&r, &mut buf);
    }
    true
}

/// A shared [`MemFile`], so that the harness can look at the bytes after
/// the engine (which owns its `Box<dyn Backing>`) wrote them.
#[derive(Debug, Clone)]
pub struct Shared(pub Arc<MemFile>);

impl Backing for Shared {
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

/// Write into the image (first 8 input bytes steer where), then check
/// and repair it. Invariants, beyond "no panic":
/// - an image `check` finds clean stays clean after successful writes,
///   and reads back what was written;
/// - when `repair` says nothing remains, `check` agrees and it opens.
///
/// Whether it opened for writing (the replay counts these).
pub fn write_repair(data: &[u8]) -> bool {
    let steer = u64::from_le_bytes(
        data.get(..8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    );
    let file = Shared(Arc::new(MemFile::writable(data)));
    let clean_before = check::check(&file).is_empty();
    let mut opened = false;
    if let Ok(layer) = VhdLayer::open(Box::new(file.clone()), "fuzz", false, VhdOptions::default())
    {
        if let Ok(img) = VhdImage::from_layers(vec![layer]) {
            opened = true;
            let size = img.virtual_size();
            let mut wrote = Vec::new();
            for i in 0..3u64 {
                if size == 0 {
                    break;
                }
                let off = (steer.rotate_left(i as u32 * 21)) % size;
                let len = (4096 + (steer >> (i * 7)) % 70_000).min(size - off) as usize;
                let buf: Vec<u8> = (0..len).map(|k| (k as u64 ^ i ^ steer) as u8 | 1).collect();
                if img.write_at(&buf, off).is_ok() {
                    wrote.push((off, buf));
                }
            }
            let flushed = img.flush().is_ok();
            // Later writes win where they overlap: check the last one.
            if let Some((off, buf)) = wrote.last() {
                let mut back = vec![0u8; buf.len()];
                if img.read_at(&mut back, *off).is_ok() {
                    assert!(back == *buf, "read after write differs at {off}");
                }
            }
            drop(img);
            if clean_before && flushed && !wrote.is_empty() {
                let after = check::check(&file);
                assert!(
                    after.is_empty(),
                    "a clean image became inconsistent: {after:?}"
                );
            }
        }
    }
    if let Ok(report) = repair::repair(&file) {
        if report.remaining.is_empty() {
            let after = check::check(&file);
            assert!(
                after.is_empty(),
                "repair left nothing, but check finds {after:?} (repair did {:?})",
                report.actions
            );
            assert!(
                VhdLayer::open(Box::new(file.clone()), "fuzz", true, VhdOptions::default()).is_ok(),
                "repaired image does not open"
            );
        }
    }
    opened
}

/// The committed, minimized corpus of `target` (`corpora/TARGET`), for
/// the stable replay tests: each test asserts how many of these get past
/// parsing.
pub fn committed_corpus(target: &str) -> Vec<Vec<u8>> {
    read_dirs(target, &["corpora"])
}

/// What libFuzzer left for `target` in this checkout (`corpus/TARGET` and
/// `artifacts/TARGET`; absent in CI), for the stable replay tests.
pub fn local_corpus(target: &str) -> Vec<Vec<u8>> {
    read_dirs(target, &["corpus", "artifacts"])
}

fn read_dirs(target: &str, dirs: &[&str]) -> Vec<Vec<u8>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if let Ok(b) = std::fs::read(p) {
                out.push(b);
            }
        }
    }
    out
}

/// The replay tests' mutation source: xorshift64, so every CI run tries
/// the same mutations and a failure reproduces.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}
