//! A tenant's buckets, shared by all of the tenant's workers.
//!
//! Why shared memory: a tenant limit binds several worker processes, and
//! asking a third party (the broker) for every request's tokens would put
//! a round trip and the broker's availability into the I/O path, which
//! the design keeps free of the broker. The broker instead creates one
//! small memfd per tenant (sealed against shrinking and growing, so that
//! no worker can make another one fault on it) and hands it only to that
//! tenant's workers: a worker can spend, or spoil, its own tenant's budget
//! and nobody else's. The buckets in it are single atomics (GCRA, see
//! [`super::gcra`]), so the processes need no lock between them and a
//! worker that dies mid-update leaves nothing held.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// Cells in a tenant memfd, one per [`tapjail_common::qos::Knob`], in
/// `Knob::ALL` order. The broker sizes the file to at least this.
pub const CELLS: usize = 4;
/// Bytes the cells take.
pub const CELLS_LEN: usize = CELLS * std::mem::size_of::<u64>();

/// The mapped cells of one tenant's memfd; unmapped on drop.
#[derive(Debug)]
pub struct SharedCells {
    ptr: NonNull<AtomicU64>,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory accessed only through
// atomics; it is owned by this value and may move between threads.
unsafe impl Send for SharedCells {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for SharedCells {}

impl SharedCells {
    /// Map the tenant memfd the broker passed. It must hold the cells
    /// (the broker made it at least a page and sealed its size).
    pub fn map(fd: OwnedFd) -> io::Result<SharedCells> {
        let len = file_len(&fd)?;
        if len < CELLS_LEN as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tenant bucket file is {} bytes, less than the {CELLS_LEN} its cells need",
                    len
                ),
            ));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL)
        // aliases no Rust object; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CELLS_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(SharedCells { ptr, _fd: fd })
    }

    /// Whether `fd` is the file these cells are mapped from.
    pub fn same_file(&self, fd: &OwnedFd) -> bool {
        match (file_id(&self._fd), file_id(fd)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// Cell `i` (`i < CELLS`).
    pub fn cell(&self, i: usize) -> &AtomicU64 {
        assert!(i < CELLS, "tenant bucket cell {i} out of range");
        // SAFETY: the mapping is page-aligned and CELLS_LEN long, so cell
        // `i` is an aligned u64 inside it; it stays mapped as long as
        // `self`, which the returned reference borrows; other processes
        // touch it only atomically, and AtomicU64 has u64's layout.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

/// The file's size, by the raw `fstat` the seccomp filter allows (glibc's
/// fstat and std's metadata take paths: newfstatat, statx).
fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer; the fd is ours.
    if unsafe { libc::syscall(libc::SYS_fstat, fd.as_raw_fd(), &mut st as *mut libc::stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn file_len(fd: &OwnedFd) -> io::Result<u64> {
    u64::try_from(fstat(fd)?.st_size).map_err(io::Error::other)
}

/// (device, inode): which file an fd is.
fn file_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

impl Drop for SharedCells {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once;
        // no reference from `cell` outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), CELLS_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn memfd(len: u64) -> OwnedFd {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f.into()
    }

    #[test]
    fn two_mappings_of_one_file_see_each_others_cells() {
        let fd = memfd(4096);
        let a = SharedCells::map(fd.try_clone().unwrap()).unwrap();
        let b = SharedCells::map(fd).unwrap();
        a.cell(3).store(42, Ordering::SeqCst);
        assert_eq!(b.cell(3).load(Ordering::SeqCst), 42);
        assert_eq!(b.cell(0).load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_file_too_small_for_the_cells_is_refused() {
        let e = SharedCells::map(memfd(8)).unwrap_err();
        assert!(e.to_string().contains("less than the 32"), "{e}");
    }
}
