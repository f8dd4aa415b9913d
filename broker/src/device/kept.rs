//! A device whose fds are kept in the broker's [`FdStore`] while it is
//! active, so that the kernel half outlives the broker (see
//! `crate::fdstore`). Wraps any backend: once `activate` or `recovered`
//! succeeds the backend's [`DeviceBackend::handoff`] fds are put in the
//! store as `mN.ROLE`; `teardown` (and dropping) removes them again.

use super::{DeviceBackend, DeviceError, HandoffFds, Prepared};
use crate::fdstore::{FdStore, Kept};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use tapjail_common::proto::FrontendKind;
use tapjail_common::Minor;

#[derive(Debug)]
pub struct KeptDevice {
    inner: Box<dyn DeviceBackend>,
    minor: Minor,
    store: Arc<FdStore>,
    kept: Option<Kept>,
}

/// The store name of `minor`'s fd of `role`.
pub fn name(minor: Minor, role: &str) -> String {
    format!("m{}.{role}", minor.get())
}

impl KeptDevice {
    pub fn new(inner: Box<dyn DeviceBackend>, minor: Minor, store: Arc<FdStore>) -> KeptDevice {
        KeptDevice {
            inner,
            minor,
            store,
            kept: None,
        }
    }

    /// Put (again) what the backend must keep. A store that fails is
    /// reported, not fatal: the disk works, it just would not survive a
    /// broker restart.
    pub fn keep(&mut self) {
        let Some((_, fds)) = self.inner.handoff() else {
            return;
        };
        let named: Vec<(String, BorrowedFd<'_>)> = fds
            .into_iter()
            .map(|(role, fd)| (name(self.minor, role), fd))
            .collect();
        match Kept::put(&self.store, &named) {
            Ok(k) => self.kept = Some(k),
            Err(e) => tracing::warn!(
                minor = self.minor.get(),
                "minor {}: cannot keep its device's fds in the {}: {e}; \
                 this disk would not survive a broker restart",
                self.minor,
                self.store.kind()
            ),
        }
    }
}

impl DeviceBackend for KeptDevice {
    fn kind(&self) -> FrontendKind {
        self.inner.kind()
    }
    fn prepare(&mut self, size: u64, read_only: bool) -> Result<Prepared, DeviceError> {
        self.inner.prepare(size, read_only)
    }
    fn activate(&mut self, worker_pid: u32) -> Result<PathBuf, DeviceError> {
        let p = self.inner.activate(worker_pid)?;
        self.keep();
        Ok(p)
    }
    fn recover(&mut self) -> Result<Prepared, DeviceError> {
        self.inner.recover()
    }
    fn recovered(&mut self, worker_pid: u32) -> Result<(), DeviceError> {
        self.inner.recovered(worker_pid)?;
        self.keep();
        Ok(())
    }
    fn sync(&mut self, closing: bool) -> Result<(), DeviceError> {
        self.inner.sync(closing)
    }
    fn in_use(&self) -> bool {
        self.inner.in_use()
    }
    fn abandon(&mut self) -> Result<(), DeviceError> {
        self.inner.abandon()
    }
    fn handoff(&self) -> Option<HandoffFds<'_>> {
        self.inner.handoff()
    }
    fn adopted(&mut self, worker_pid: Option<u32>) {
        self.inner.adopted(worker_pid);
    }
    fn teardown(&mut self) -> Result<(), DeviceError> {
        let r = self.inner.teardown();
        drop(self.kept.take());
        crate::phases::lap("td_fdstore");
        r
    }
}
