//! Request buffers and who may hold them.
//!
//! `read(2)` on `/dev/fuse` refuses a buffer smaller than `max_write` plus
//! the WRITE headers, so reading a request takes a big buffer (264 KiB),
//! all of it locked memory. When every serving thread owned one, the
//! RLIMIT_MEMLOCK headroom (8 MiB in all on the machines we measured)
//! allowed five threads, i.e. five requests in flight against the image,
//! and 4 KiB random I/O was limited by that depth, not by CPU.
//!
//! So the few big buffers are shared ([`BigPool`]), and each thread owns
//! only a small one ([`IoBuf::small`]). A thread takes a big buffer, reads
//! one request, and if it is a READ or WRITE that fits its small buffer
//! (copying a WRITE's payload, a few KiB) gives the big one back before
//! the image I/O starts; only larger requests keep theirs until replied.
//! Depth for small requests is then the thread count, which costs a stack
//! and a small buffer each.

use crate::frontend::FrontendError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::abi;
use super::request::MAX_WRITE;

pub const PAGE: usize = 4096;
/// Bytes in front of WRITE data: `fuse_in_header` + `fuse_write_in`.
pub const WRITE_PREFIX: usize = abi::IN_HEADER_LEN + abi::WRITE_IN_LEN;
/// Data a thread's own buffer holds: READs and WRITEs up to this size run
/// without a big buffer. 4 KiB random I/O needs 4 KiB; filesystems on the
/// device send up to 16 KiB often enough to be worth the 12 KiB per thread.
pub const SMALL_DATA: usize = 16 * 1024;

/// A buffer whose data area is page-aligned (an image opened `O_DIRECT`
/// then needs no bounce buffer). For a big buffer the request is read so
/// that a WRITE's payload lands at the data area.
#[derive(Debug)]
pub struct IoBuf {
    mem: Vec<u8>,
    /// Offset of the page-aligned data area.
    data: usize,
    /// Bytes of the data area.
    cap: usize,
}

impl IoBuf {
    /// Locked bytes of a big buffer.
    pub const BIG_LEN: usize = MAX_WRITE + 2 * PAGE;
    /// Locked bytes of a small buffer.
    pub const SMALL_LEN: usize = SMALL_DATA + PAGE;

    /// A buffer `read(2)` of `/dev/fuse` accepts.
    pub fn big() -> Result<Self, FrontendError> {
        // Room for the WRITE headers in the page before the data area.
        Self::with(MAX_WRITE, PAGE, Self::BIG_LEN)
    }

    /// A thread's own buffer for small READ replies and WRITE payloads.
    pub fn small() -> Result<Self, FrontendError> {
        Self::with(SMALL_DATA, 0, Self::SMALL_LEN)
    }

    /// Locked bytes of a throttle-lane slot.
    pub const SLOT_LEN: usize = PAGE + PAGE;

    /// A delayed write's payload of up to one page, waiting in the FUSE
    /// throttle lane (`super::lanes`).
    pub fn slot() -> Result<Self, FrontendError> {
        Self::with(PAGE, 0, Self::SLOT_LEN)
    }

    /// Allocate without aborting: under `mlockall(MCL_FUTURE)` an
    /// allocation beyond RLIMIT_MEMLOCK fails, and that must become an
    /// error (fewer threads), not the process aborting.
    fn with(cap: usize, front: usize, len: usize) -> Result<Self, FrontendError> {
        let mut mem = Vec::new();
        mem.try_reserve_exact(len).map_err(|e| {
            FrontendError::Unavailable(format!(
                "fuse: cannot allocate a {} KiB request buffer ({e}); RLIMIT_MEMLOCK too small",
                len / 1024
            ))
        })?;
        mem.resize(len, 0);
        // align < PAGE and front + PAGE + cap <= len for both kinds, so
        // the data area fits; for a big buffer data >= PAGE > WRITE_PREFIX.
        let align = mem.as_ptr().align_offset(PAGE).min(PAGE - 1);
        Ok(IoBuf {
            data: align + front,
            cap,
            mem,
        })
    }

    /// Where `read(2)` puts a request: the kernel wants room for
    /// `max_write` plus the WRITE headers. Only for big buffers.
    pub fn request_area(&mut self) -> &mut [u8] {
        let start = self.data.saturating_sub(WRITE_PREFIX);
        &mut self.mem[start..self.data + self.cap]
    }

    /// The `n` bytes a read put in [`IoBuf::request_area`].
    pub fn request(&self, n: usize) -> &[u8] {
        let start = self.data.saturating_sub(WRITE_PREFIX);
        let end = self.data + self.cap;
        &self.mem[start..end.min(start.saturating_add(n))]
    }

    pub fn data_area(&mut self) -> &mut [u8] {
        &mut self.mem[self.data..self.data + self.cap]
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct PoolState {
    /// Capacity reserved for every buffer, so `put` never allocates.
    free: Vec<IoBuf>,
    /// Threads waiting in [`BigPool::take`].
    sleepers: usize,
    closed: bool,
}

/// The big buffers, shared by the serving threads.
#[derive(Debug, Default)]
pub struct BigPool {
    state: Mutex<PoolState>,
    ready: Condvar,
    /// Threads holding a big buffer while waiting for a request: while one
    /// does, a returned buffer needs nobody woken to read the next request
    /// (a wake is a syscall and a context switch).
    polling: AtomicUsize,
}

impl BigPool {
    /// Allocate up to `n` big buffers (at least one, or the error).
    pub fn fill(&self, n: usize) -> Result<usize, FrontendError> {
        let mut s = lock(&self.state);
        s.free
            .try_reserve_exact(n.max(1))
            .map_err(|e| FrontendError::Unavailable(format!("fuse: buffer pool: {e}")))?;
        for i in 0..n.max(1) {
            match IoBuf::big() {
                Ok(b) => s.free.push(b),
                Err(e) if i == 0 => return Err(e),
                Err(_) => return Ok(i),
            }
        }
        Ok(n.max(1))
    }

    /// A big buffer, waiting for one if all are held; `None` once closed.
    pub fn take(&self) -> Option<IoBuf> {
        let mut s = lock(&self.state);
        loop {
            if s.closed {
                return None;
            }
            if let Some(b) = s.free.pop() {
                return Some(b);
            }
            s.sleepers += 1;
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
            s.sleepers -= 1;
        }
    }

    /// Give a buffer back; wake a waiting thread to read the next request
    /// unless one already waits on the device.
    pub fn put(&self, buf: IoBuf) {
        let mut s = lock(&self.state);
        // Within the reserved capacity: no allocation.
        s.free.push(buf);
        let wake = s.sleepers > 0 && self.polling.load(Ordering::SeqCst) == 0;
        drop(s);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Run `wait` (a wait for the device) counted as polling.
    pub fn polling<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.polling.fetch_add(1, Ordering::SeqCst);
        let r = wait();
        self.polling.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Make every `take` return `None` (serving stops).
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    /// Free the buffers once serving is over.
    pub fn clear(&self) {
        lock(&self.state).free = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn buffers_have_page_aligned_data_and_room_for_write_headers() {
        let mut big = IoBuf::big().unwrap();
        assert_eq!(big.data_area().as_ptr().align_offset(PAGE), 0);
        assert_eq!(big.cap(), MAX_WRITE);
        assert_eq!(big.request_area().len(), WRITE_PREFIX + MAX_WRITE);
        assert_eq!(big.request(100).len(), 100);
        assert_eq!(big.request(usize::MAX).len(), WRITE_PREFIX + MAX_WRITE);
        let mut small = IoBuf::small().unwrap();
        assert_eq!(small.data_area().as_ptr().align_offset(PAGE), 0);
        assert_eq!(small.data_area().len(), SMALL_DATA);
    }

    #[test]
    fn pool_hands_out_each_buffer_once_and_close_wakes_waiters() {
        let pool = Arc::new(BigPool::default());
        assert_eq!(pool.fill(2).unwrap(), 2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let p = pool.clone();
        let waiter = std::thread::spawn(move || p.take().map(|b| b.cap()));
        // The waiter gets the returned buffer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        pool.put(a);
        assert_eq!(waiter.join().unwrap(), Some(MAX_WRITE));
        let p = pool.clone();
        let waiter = std::thread::spawn(move || p.take().is_none());
        std::thread::sleep(std::time::Duration::from_millis(20));
        pool.close();
        assert!(waiter.join().unwrap(), "close must wake a waiting take");
        pool.put(b);
        assert!(pool.take().is_none(), "a closed pool hands out nothing");
    }
}
