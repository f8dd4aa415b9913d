//! Lock-free per-layer counters, cheap enough for the hot path.

use super::LayerStats;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct LayerCounters {
    read_secs: AtomicU64,
    write_secs: AtomicU64,
    read_fail: AtomicU64,
    write_fail: AtomicU64,
}

impl LayerCounters {
    pub fn read(&self, bytes: u64) {
        self.read_secs
            .fetch_add(bytes.div_ceil(super::SECTOR_SIZE), Relaxed);
    }

    pub fn write(&self, bytes: u64) {
        self.write_secs
            .fetch_add(bytes.div_ceil(super::SECTOR_SIZE), Relaxed);
    }

    pub fn read_failed(&self) {
        self.read_fail.fetch_add(1, Relaxed);
    }

    pub fn write_failed(&self) {
        self.write_fail.fetch_add(1, Relaxed);
    }

    /// Record the outcome of a read of `bytes`.
    pub fn on_read<T, E>(&self, bytes: u64, r: Result<T, E>) -> Result<T, E> {
        match &r {
            Ok(_) => self.read(bytes),
            Err(_) => self.read_failed(),
        }
        r
    }

    /// Record the outcome of a write of `bytes`.
    pub fn on_write<T, E>(&self, bytes: u64, r: Result<T, E>) -> Result<T, E> {
        match &r {
            Ok(_) => self.write(bytes),
            Err(_) => self.write_failed(),
        }
        r
    }

    pub fn snapshot(&self, name: &str, driver: &'static str) -> LayerStats {
        LayerStats {
            name: name.to_string(),
            driver,
            hits: [self.read_secs.load(Relaxed), self.write_secs.load(Relaxed)],
            fail: [self.read_fail.load(Relaxed), self.write_fail.load(Relaxed)],
        }
    }
}
