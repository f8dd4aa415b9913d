//! A disk served by its former mirror secondary (`unpause -2 URI` once the
//! mirror is in sync): every request goes over the NBD connection. The
//! secondary is now the only copy, so its errors are the guest's errors.

use super::Mirror;
use crate::image::{Extent, Image, ImageError, LayerStats};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Debug)]
pub struct Secondary {
    mirror: Arc<Mirror>,
    hits: [AtomicU64; 2],
    fail: [AtomicU64; 2],
}

impl Secondary {
    pub fn new(mirror: Arc<Mirror>) -> Secondary {
        Secondary {
            mirror,
            hits: Default::default(),
            fail: Default::default(),
        }
    }

    fn io<T>(
        &self,
        dir: usize,
        offset: u64,
        f: impl FnOnce(&mut super::NbdClient<std::fs::File>) -> Result<T, super::ClientError>,
    ) -> Result<T, ImageError> {
        let mut g = self.mirror.client.lock().unwrap_or_else(|e| e.into_inner());
        let r = match g.as_mut() {
            None => Err(format!("the connection to {} is gone", self.mirror.uri)),
            Some(c) => f(c).map_err(|e| e.to_string()),
        };
        r.map_err(|why| {
            self.fail[dir].fetch_add(1, Relaxed);
            ImageError::Io {
                op: "serving from the secondary",
                offset,
                source: std::io::Error::other(why),
            }
        })
    }
}

impl Image for Secondary {
    fn virtual_size(&self) -> u64 {
        self.mirror.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.io(0, offset, |c| c.read_at(buf, offset))?;
        self.hits[0].fetch_add(buf.len() as u64 / 512, Relaxed);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.io(1, offset, |c| c.write_at(buf, offset))?;
        self.hits[1].fetch_add(buf.len() as u64 / 512, Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.io(1, 0, |c| c.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), ImageError> {
        let m = self.mirror.clone();
        m.zero_secondary(offset, len, &mut |z, off| {
            self.io(1, off, |c| c.write_at(z, off))
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, ImageError> {
        Ok(Extent {
            len: len.min(self.mirror.size.saturating_sub(offset)).max(1),
            allocated: true,
            zero: false,
        })
    }

    fn stats(&self) -> Vec<LayerStats> {
        vec![LayerStats {
            name: self.mirror.uri.clone(),
            driver: "nbd",
            hits: [self.hits[0].load(Relaxed), self.hits[1].load(Relaxed)],
            fail: [self.fail[0].load(Relaxed), self.fail[1].load(Relaxed)],
        }]
    }
}
