//! The fuzz harness body, shared by the libFuzzer target and the stable
//! replay test: treat the input as a whole image file, open it as a VHD,
//! and read, map and check it. Anything but a panic is fine.

use std::io;
use std::sync::Mutex;
use tapjail_worker::image::vhd::{check, VhdImage, VhdLayer, VhdOptions};
use tapjail_worker::image::{Backing, Image};

/// An in-memory file: the fuzz input, writable so that nothing leaks to disk.
#[derive(Debug)]
pub struct MemFile(Mutex<Vec<u8>>);

impl MemFile {
    pub fn new(b: &[u8]) -> Self {
        MemFile(Mutex::new(b.to_vec()))
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
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Open, read the start, the end and a few places, ask block status and
/// run `check`.
pub fn open_read(data: &[u8]) {
    let _ = check::check(&MemFile::new(data));
    let Ok(layer) = VhdLayer::open(
        Box::new(MemFile::new(data)),
        "fuzz",
        true,
        VhdOptions::default(),
    ) else {
        return;
    };
    let Ok(img) = VhdImage::from_layers(vec![layer]) else {
        return;
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
}

/// The FUSE frontend's request path: parse one `/dev/fuse` message and, if
/// it parses, answer it from the one-file filesystem over a small
/// in-memory disk (writes fail, as the fuzz input is read-only). Anything
/// but a panic is fine.
pub fn fuse_request(data: &[u8]) {
    use std::sync::Arc;
    use tapjail_worker::disk::Disk;
    use tapjail_worker::frontend::fuse::fs::{OneFileFs, Outcome};
    use tapjail_worker::frontend::fuse::request;
    use tapjail_worker::image::raw::RawImage;

    let Ok(req) = request::parse(data) else {
        return;
    };
    let Ok(img) = RawImage::open(Box::new(MemFile::new(&[0u8; 65536])), "fuzz", false) else {
        return;
    };
    let fs = OneFileFs::new(Disk::new(Arc::new(img)), "disk");
    if let Outcome::Read(r) = fs.handle(&req) {
        let mut buf = vec![0u8; request::MAX_READ];
        let _ = fs.read(&r, &mut buf);
    }
}
