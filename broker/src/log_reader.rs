//! One thread reads every worker's log pipe (epoll), not a thread per
//! worker.
//!
//! A thread per attached disk made the broker's address space grow with
//! the disks (a stack mapping each), and every `fork` the broker makes
//! (the image-open helper, each worker's spawn) copies the address space:
//! at 1000 disks a fork took 27 ms instead of 0.6 ms, twice per `create`
//! (bench/README.md, "control plane"). Each pipe keeps its own
//! [`LineFilter`], so a worker's lines are tagged, escaped, cut and
//! rate-limited exactly as before; a worker that writes a lot gets one
//! 4 KiB read per wakeup, like every other.

use crate::worker_log::{self, LineFilter, Relayed, TICK};
use rustix::event::epoll;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Source {
    pipe: io::PipeReader,
    pid: u32,
    filter: LineFilter,
}

impl Source {
    /// Where this worker's lines go: a `tapdisk` event whose pid and minor
    /// the broker sets (`worker_log::log`).
    fn out(pid: u32) -> impl FnMut(Relayed) {
        move |r| worker_log::log(pid, worker_log::minor_of(pid), &r)
    }
}

struct Reader {
    epoll: OwnedFd,
    /// Pipes added since the reader last looked; it owns them from then
    /// on (so adding never waits for a line being written out).
    pending: Mutex<Vec<(u64, Source)>>,
    next: AtomicU64,
}

fn reader() -> io::Result<&'static Reader> {
    static READER: OnceLock<Result<Reader, String>> = OnceLock::new();
    let r = READER.get_or_init(|| {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
        Ok(Reader {
            epoll,
            pending: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        })
    });
    let r = r.as_ref().map_err(|e| io::Error::other(e.clone()))?;
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("worker-logs".into())
                .spawn(move || run(r))
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))?;
    Ok(r)
}

/// Read worker `pid`'s stderr until the worker and every copy of the
/// write end are gone.
pub fn add(pipe: io::PipeReader, pid: u32) -> io::Result<()> {
    let r = reader()?;
    let id = r.next.fetch_add(1, Ordering::Relaxed);
    epoll::add(
        &r.epoll,
        &pipe,
        epoll::EventData::new_u64(id),
        epoll::EventFlags::IN,
    )?;
    // An event the reader sees before this is there is reported again
    // (level-triggered) once it is.
    r.pending.lock().unwrap_or_else(|e| e.into_inner()).push((
        id,
        Source {
            pipe,
            pid,
            filter: LineFilter::new(),
        },
    ));
    Ok(())
}

fn run(r: &Reader) {
    let mut sources: HashMap<u64, Source> = HashMap::new();
    let mut events = Vec::with_capacity(64);
    let mut buf = [0u8; 4096];
    let mut ticked = Instant::now();
    let tick = rustix::event::Timespec {
        tv_sec: i64::try_from(TICK.as_secs()).unwrap_or(1),
        tv_nsec: 0,
    };
    loop {
        events.clear();
        match epoll::wait(
            &r.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&tick),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(
                    "worker log reader stops: epoll_wait: {e}; workers' log lines are lost"
                );
                return;
            }
        }
        sources.extend(
            r.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        let now = Instant::now();
        for ev in &events {
            let id = ev.data.u64();
            let Some(s) = sources.get_mut(&id) else {
                continue;
            };
            match s.pipe.read(&mut buf) {
                Ok(n) if n > 0 => s.filter.feed(&buf[..n], now, &mut Source::out(s.pid)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EOF (the worker and every copy of the write end gone)
                // or a broken pipe: done with it.
                _ => {
                    if let Some(mut s) = sources.remove(&id) {
                        let _ = epoll::delete(&r.epoll, &s.pipe);
                        s.filter.finish(now, &mut Source::out(s.pid));
                    }
                }
            }
        }
        if now.duration_since(ticked) >= TICK {
            ticked = now;
            for s in sources.values_mut() {
                s.filter.tick(now, &mut Source::out(s.pid));
            }
        }
    }
}
