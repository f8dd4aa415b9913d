//! The lease an operation takes a minor through.
//!
//! An operation leases a minor from the table (checking the phase it
//! expects), works on the phase it now owns without the table lock (the
//! worker and the kernel are slow), and commits the next phase. A lease
//! dropped without a commit, by an error or a panic, puts back the phase
//! it holds, so the minor stays usable. While leased, `list` shows the
//! minor as it was and other requests on it are refused as busy. Nothing
//! else marks a minor busy.

use crate::error::BrokerError;
use crate::lifecycle::Phase;
use crate::table::Table;
use std::sync::{Mutex, MutexGuard};
use tapjail_common::Minor;

/// A minor held by one operation.
#[derive(Debug)]
pub struct Lease<'a> {
    table: &'a Mutex<Table>,
    minor: Minor,
    /// The phase being worked on; put back on drop unless committed.
    phase: Option<Phase>,
}

impl<'a> Lease<'a> {
    /// Lease `minor` if it is idle and `expect` accepts its phase. Takes
    /// the table guard and releases it: the work runs unlocked, and the
    /// lease relocks to give the minor back (so it must never be dropped
    /// by a thread that holds the lock).
    pub fn take(
        table: &'a Mutex<Table>,
        mut t: MutexGuard<'_, Table>,
        minor: Minor,
        op: &'static str,
        expect: impl FnOnce(&Table, &Phase) -> Result<(), BrokerError>,
    ) -> Result<Lease<'a>, BrokerError> {
        let phase = t.disk(minor)?.phase()?;
        expect(&t, phase)?;
        let phase = t.disk_mut(minor)?.lease_out(op)?;
        drop(t);
        Ok(Lease {
            table,
            minor,
            phase: Some(phase),
        })
    }

    pub fn minor(&self) -> Minor {
        self.minor
    }

    pub fn phase(&self) -> &Phase {
        self.phase
            .as_ref()
            .expect("lease holds a phase until it ends")
    }

    /// Change the held phase as irreversible work happens (a torn-down
    /// device, a new worker), so that a failure puts back the truth.
    pub fn phase_mut(&mut self) -> &mut Phase {
        self.phase
            .as_mut()
            .expect("lease holds a phase until it ends")
    }

    /// Take the held phase out to rebuild it; `commit` or `set` puts one back.
    pub fn set(&mut self, phase: Phase) {
        self.phase = Some(phase);
    }

    fn lock(&self) -> MutexGuard<'a, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the operation with `next` as the minor's phase.
    pub fn commit(mut self, next: Phase) {
        self.phase = Some(next);
        self.give_back();
    }

    /// End the operation and free the minor (destroy, a failed create).
    pub fn discard(mut self) {
        let phase = self.phase.take();
        let mut t = self.lock();
        t.set_files(self.minor, &[]);
        if let Some(mut disk) = t.disks.remove(&self.minor) {
            if let Some(p) = phase {
                disk.restore_for_release(p);
            }
            disk.release();
        }
    }

    fn give_back(&mut self) {
        let Some(phase) = self.phase.take() else {
            return;
        };
        let mut t = self.lock();
        let died = phase.worker().is_some_and(|w| t.died_unasked(w));
        let files = phase.image().map(|i| i.files.clone()).unwrap_or_default();
        if let Ok(disk) = t.disk_mut(self.minor) {
            disk.settle(phase, died);
        }
        t.set_files(self.minor, &files);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}
