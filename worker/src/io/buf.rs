//! Page-aligned I/O buffers and a pool that reuses them.
//!
//! Aligned so that requests can go to an `O_DIRECT` file without a bounce
//! copy; pooled because under `mlockall(MCL_FUTURE)` every fresh mapping is
//! faulted in and locked up front, which is expensive for large buffers.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer (a page; more than any DIO alignment).
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned byte buffer of fixed capacity whose
/// visible length can be set up to that capacity.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to a page).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(BUF_ALIGN).saturating_mul(BUF_ALIGN);
        let layout = match Layout::from_size_align(cap, BUF_ALIGN) {
            Ok(l) => l,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the visible length (≤ capacity). Bytes keep their old values.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap ≥ len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap ≥ len initialised bytes, exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, BUF_ALIGN),
            )
        };
    }
}

/// Size classes are powers of two from 4 KiB up to this.
const MAX_POOLED: usize = 32 << 20;
const CLASSES: usize = (MAX_POOLED / BUF_ALIGN).trailing_zeros() as usize + 1;

/// A pool of [`AlignedBuf`]s by power-of-two size class, keeping at most
/// `max_bytes` idle.
#[derive(Debug)]
pub struct BufPool {
    classes: Mutex<[Vec<AlignedBuf>; CLASSES]>,
    idle_bytes: Mutex<usize>,
    max_bytes: usize,
}

impl BufPool {
    pub fn new(max_bytes: usize) -> BufPool {
        BufPool {
            classes: Mutex::new(std::array::from_fn(|_| Vec::new())),
            idle_bytes: Mutex::new(0),
            max_bytes,
        }
    }

    fn class_of(cap: usize) -> Option<usize> {
        if cap > MAX_POOLED {
            return None;
        }
        let pages = cap.div_ceil(BUF_ALIGN).next_power_of_two();
        Some(pages.trailing_zeros() as usize)
    }

    /// A buffer of visible length `len`, contents unspecified (but initialised).
    pub fn get(&self, len: usize) -> AlignedBuf {
        let Some(class) = Self::class_of(len.max(1)) else {
            return AlignedBuf::zeroed(len);
        };
        let reused = {
            let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            classes[class].pop()
        };
        match reused {
            Some(mut buf) => {
                let mut idle = self.idle_bytes.lock().unwrap_or_else(|e| e.into_inner());
                *idle = idle.saturating_sub(buf.capacity());
                buf.set_len(len);
                buf
            }
            None => {
                let mut buf = AlignedBuf::zeroed(BUF_ALIGN << class);
                buf.set_len(len);
                buf
            }
        }
    }

    /// Return a buffer for reuse (dropped if the pool is full).
    pub fn put(&self, buf: AlignedBuf) {
        let cap = buf.capacity();
        let Some(class) = Self::class_of(cap) else {
            return;
        };
        if cap != BUF_ALIGN << class {
            return; // not one of ours
        }
        {
            let mut idle = self.idle_bytes.lock().unwrap_or_else(|e| e.into_inner());
            if idle.saturating_add(cap) > self.max_bytes {
                return;
            }
            *idle += cap;
        }
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes[class].push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_page_aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_reuses_buffers_of_the_same_class() {
        let pool = BufPool::new(1 << 20);
        let mut b = pool.get(4096);
        b[0] = 7;
        let p = b.as_ptr();
        pool.put(b);
        let b = pool.get(3000);
        assert_eq!(b.as_ptr(), p);
        assert_eq!(b.len(), 3000);
        assert_eq!(pool.get(4096).capacity(), 4096);
    }

    #[test]
    fn pool_drops_buffers_beyond_its_budget() {
        let pool = BufPool::new(4096);
        pool.put(pool.get(4096));
        pool.put(pool.get(4096)); // the first is reused, so only one is idle
        let a = pool.get(4096);
        let b = pool.get(4096);
        pool.put(a);
        pool.put(b); // over budget: dropped
        assert_eq!(*pool.idle_bytes.lock().unwrap(), 4096);
    }
}
