//! The two memory areas a ublk queue works with, as small owners of raw
//! mappings: the driver's descriptor array (mapped read-only from
//! `/dev/ublkcN`) and the per-tag data buffers the driver copies request
//! data into and out of.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use tapjail_common::ublk_abi::{self, UblksrvIoDesc};

/// The system page size, which the descriptor mmap rule is based on.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// A mapping that is unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize, prot: i32, flags: i32, fd: i32, offset: u64) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases
        // nothing; the result is checked for MAP_FAILED.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One queue's request descriptors, written by the driver, indexed by tag.
#[derive(Debug)]
pub struct DescArray {
    map: Mapping,
    depth: u16,
}

impl DescArray {
    /// Map queue `q_id`'s array from the char device. The driver allows
    /// read-only shared mappings of exactly the queue's size, at the offset
    /// [`ublk_abi::queue_desc_map_offset`] gives, from one process only.
    pub fn map(fd: BorrowedFd<'_>, q_id: u16, depth: u16) -> io::Result<Self> {
        let page = page_size();
        let len = usize::try_from(ublk_abi::queue_desc_map_len(depth, page))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = ublk_abi::queue_desc_map_offset(q_id, page);
        let map = Mapping::new(
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            off,
        )?;
        Ok(DescArray { map, depth })
    }

    /// The descriptor of `tag`, copied out (the driver rewrites it for the
    /// next request only after we commit this one).
    pub fn get(&self, tag: u16) -> Option<UblksrvIoDesc> {
        if tag >= self.depth {
            return None;
        }
        let at = usize::from(tag) * std::mem::size_of::<UblksrvIoDesc>();
        // SAFETY: tag < depth, so the descriptor lies inside the mapping
        // (its length is depth * 24 rounded up to pages); the mapping is
        // page aligned and 24 is a multiple of the struct's 8-byte
        // alignment. Volatile because the kernel writes this memory.
        Some(unsafe {
            std::ptr::read_volatile(self.map.ptr.as_ptr().add(at).cast::<UblksrvIoDesc>())
        })
    }
}

/// The per-tag data buffers, `per_tag` bytes each, in one anonymous mapping.
#[derive(Debug)]
pub struct IoBuffers {
    map: Mapping,
    per_tag: usize,
    depth: u16,
}

impl IoBuffers {
    pub fn new(depth: u16, per_tag: u32) -> io::Result<Self> {
        let per_tag = usize::try_from(per_tag).map_err(|_| io::Error::other("buffer size"))?;
        let len = per_tag
            .checked_mul(usize::from(depth))
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let map = Mapping::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        Ok(IoBuffers {
            map,
            per_tag,
            depth,
        })
    }

    /// The address the driver copies `tag`'s data to and from.
    pub fn addr(&self, tag: u16) -> u64 {
        let tag = usize::from(tag.min(self.depth.saturating_sub(1)));
        self.map.ptr.as_ptr() as u64 + (tag * self.per_tag) as u64
    }

    /// `tag`'s buffer, `len` bytes of it. Only while the queue owns the tag
    /// (between a completion and the commit) does the driver leave it alone.
    pub fn get_mut(&mut self, tag: u16, len: usize) -> Option<&mut [u8]> {
        if tag >= self.depth || len > self.per_tag {
            return None;
        }
        let at = usize::from(tag) * self.per_tag;
        // SAFETY: at + len <= depth * per_tag = the mapping's length; the
        // exclusive borrow of self prevents overlapping slices from us, and
        // the driver touches a tag's buffer only while it owns the tag.
        Some(unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr().add(at), len) })
    }
}

impl IoBuffers {
    /// `tag`'s buffer, `len` bytes of it, as a region another thread may
    /// work on (the slow path) while the queue thread leaves the tag alone.
    pub fn region(&self, tag: u16, len: usize) -> Option<TagRegion> {
        if tag >= self.depth || len > self.per_tag {
            return None;
        }
        let at = usize::from(tag) * self.per_tag;
        // SAFETY: at + len <= the mapping's length (checked above), so the
        // pointer stays inside the mapping and is non-null.
        let ptr = unsafe { NonNull::new_unchecked(self.map.ptr.as_ptr().add(at)) };
        Some(TagRegion { ptr, len })
    }
}

/// One tag's buffer handed to another thread (see [`IoBuffers::region`]).
#[derive(Debug)]
pub struct TagRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory inside `IoBuffers`; whoever holds the
// region is its only user until it hands the tag back (see `as_mut_slice`).
unsafe impl Send for TagRegion {}

impl TagRegion {
    /// The bytes.
    ///
    /// # Safety
    /// The `IoBuffers` it came from must outlive the returned slice, and
    /// nothing else (the queue thread, the driver) may touch this tag's
    /// buffer meanwhile: the tag is owned by the region's holder from the
    /// request's arrival until its commit.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: in bounds (see `region`); exclusivity and lifetime are
        // the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_buffers_slices_stay_inside_their_tag() {
        let mut b = IoBuffers::new(4, 8192).unwrap();
        assert_eq!(b.addr(1) - b.addr(0), 8192);
        b.get_mut(3, 8192).unwrap().fill(7);
        assert!(b.get_mut(4, 1).is_none());
        assert!(b.get_mut(0, 8193).is_none());
        assert_eq!(b.get_mut(3, 8192).unwrap()[8191], 7);
        assert_eq!(b.get_mut(2, 8192).unwrap()[0], 0);
    }

    #[test]
    fn io_buffers_refuse_zero_size() {
        assert!(IoBuffers::new(0, 4096).is_err());
    }
}
