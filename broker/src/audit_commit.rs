//! Group commit for the audit log: concurrent requests share one fsync.
//!
//! Every line is written (page cache, in chain order) under the audit
//! lock, then the writer waits here, without that lock, until its line is
//! durable. The first waiter to find no sync running leads: it fsyncs
//! everything written so far and wakes the others; lines written while
//! it synced wait for the next one, which one of them leads. Nobody
//! returns before a sync that began after its line was written has
//! succeeded, so no request is acted on or acknowledged before its record
//! is on disk; with N concurrent writers there are about 2 fsyncs per
//! round instead of N.
//!
//! A failed fsync fails every line not yet durable, and the broker stops
//! serving (as for a failed write): what reached the disk is unknown.

use std::fs::File;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A line's place in the order of writes: durable once `durable >= it`.
pub type Ticket = u64;

#[derive(Debug, Default)]
struct State {
    written: Ticket,
    durable: Ticket,
    syncing: bool,
    failed: Option<String>,
    /// The file being written (a handle of its own, so a sync needs no
    /// lock); dropped at a rotation.
    file: Option<Arc<File>>,
    syncs: u64,
}

#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    synced: Condvar,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A line was just written to the file `handle` gives (called under
    /// the audit lock, so tickets follow the file's order): its ticket.
    pub fn wrote(&self, handle: impl FnOnce() -> io::Result<File>) -> io::Result<Ticket> {
        let mut s = self.lock();
        if s.file.is_none() {
            s.file = Some(Arc::new(handle()?));
        }
        s.written += 1;
        Ok(s.written)
    }

    /// Return once line `ticket` is durable, leading a sync if none runs.
    pub fn wait(&self, ticket: Ticket) -> Result<(), String> {
        self.wait_with(ticket, |f, _| f.sync_data())
    }

    fn wait_with(
        &self,
        ticket: Ticket,
        sync: impl Fn(&File, Ticket) -> io::Result<()>,
    ) -> Result<(), String> {
        let mut s = self.lock();
        loop {
            if s.durable >= ticket {
                return Ok(());
            }
            if let Some(why) = &s.failed {
                return Err(why.clone());
            }
            if s.syncing {
                s = self.synced.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead: everything written by now is covered by this sync.
            let (target, file) = (s.written, s.file.clone());
            s.syncing = true;
            drop(s);
            let res = match &file {
                Some(f) => sync(f, target),
                None => Ok(()),
            };
            s = self.lock();
            s.syncing = false;
            s.syncs += 1;
            match res {
                Ok(()) => s.durable = s.durable.max(target),
                Err(e) => s.failed = Some(format!("cannot fsync the audit log: {e}")),
            }
            self.synced.notify_all();
        }
    }

    /// The last line written, if it is not durable yet.
    pub fn behind(&self) -> Option<Ticket> {
        let s = self.lock();
        (s.written > s.durable && s.failed.is_none()).then_some(s.written)
    }

    /// Make everything written so far durable and forget the file (called
    /// under the audit lock before a rotation switches files).
    pub fn settle(&self) -> Result<(), String> {
        let last = self.lock().written;
        self.wait(last)?;
        self.lock().file = None;
        Ok(())
    }

    /// fsyncs made so far (for the tests).
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn handle() -> io::Result<File> {
        tempfile::tempfile()
    }

    /// Each sync records the lines it covers (all written when it began);
    /// every writer must return only after a sync covering its line has
    /// ended, and 8 writers waiting together must share syncs.
    #[test]
    fn concurrent_writers_share_syncs_and_none_returns_before_its_line_is_synced() {
        let gc = Arc::new(GroupCommit::default());
        // Written lines, bumped with the ticket, as the audit lock would.
        let written = Arc::new(Mutex::new(0u64));
        let covered = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, written, covered) = (gc.clone(), written.clone(), covered.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let ticket = {
                            let mut w = written.lock().unwrap();
                            *w += 1;
                            gc.wrote(handle).unwrap()
                        };
                        gc.wait_with(ticket, |_, upto| {
                            // A slow disk: others pile up behind it.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            covered.fetch_max(upto, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                        assert!(
                            covered.load(Ordering::SeqCst) >= ticket,
                            "returned before a sync covered line {ticket}"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let syncs = gc.syncs();
        assert!(syncs < 400, "{syncs} syncs for 400 lines: none shared");
        assert!(syncs >= 1);
    }

    #[test]
    fn a_failed_sync_fails_every_waiting_line_and_later_ones() {
        let gc = GroupCommit::default();
        let t1 = gc.wrote(handle).unwrap();
        let err = gc
            .wait_with(t1, |_, _| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert!(err.contains("cannot fsync the audit log"), "{err}");
        let t2 = gc.wrote(handle).unwrap();
        assert!(
            gc.wait_with(t2, |_, _| Ok(())).is_err(),
            "failure is sticky"
        );
    }

    #[test]
    fn a_line_already_covered_needs_no_sync_of_its_own() {
        let gc = GroupCommit::default();
        let t1 = gc.wrote(handle).unwrap();
        let t2 = gc.wrote(handle).unwrap();
        gc.wait(t2).unwrap();
        gc.wait(t1).unwrap();
        assert_eq!(gc.syncs(), 1);
    }
}
