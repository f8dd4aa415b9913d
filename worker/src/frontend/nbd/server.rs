//! The NBD frontend: accepts clients on the listening socket it was handed,
//! negotiates with each on its own thread, and serves them all from one
//! shared I/O pool (see [`super::conn`]).
//!
//! Hostile clients are contained: negotiation has a deadline
//! ([`HANDSHAKE_TIMEOUT`]) and an option limit, connections beyond the
//! planned maximum ([`Sizing`]) are closed on accept, protocol violations close only
//! the offending connection, and a client that stops reading is dropped
//! after [`super::conn::SEND_TIMEOUT`].

use super::conn::{self, End, ServerCtx, SEND_TIMEOUT};
use super::handshake::{self, ExportInfo, Outcome};
use super::sizing::{Sizing, CONN_STACK};
use super::sock::Sock;
use crate::disk::Disk;
use crate::frontend::{spawn_thread_sized, Frontend, FrontendError, Stopper};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A client must finish negotiating within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Shared {
    stopping: AtomicBool,
    clients: Mutex<HashMap<u64, Arc<Sock>>>,
    /// Signalled when a client leaves `clients` (or on stop), so an accept
    /// loop waiting for a free slot wakes.
    client_left: Condvar,
    /// Connections accepted so far (for logs and tests).
    accepted: AtomicU64,
}

impl Shared {
    /// Blocks while `max` clients are connected, until one leaves or the
    /// server stops.
    fn wait_for_slot(&self, max: usize) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        while clients.len() >= max && !self.stopping.load(Ordering::SeqCst) {
            clients = self
                .client_left
                .wait(clients)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn leave(&self, id: u64) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.client_left.notify_all();
    }
}

/// Serves one export over NBD on a listening socket.
#[derive(Debug)]
pub struct NbdFrontend {
    listener: Arc<OwnedFd>,
    export_name: String,
    shared: Arc<Shared>,
}

pub(crate) fn log(msg: std::fmt::Arguments<'_>) {
    tracing::info!(frontend = "nbd", "{msg}");
}

impl NbdFrontend {
    /// `listener`: a bound, listening stream socket (fds of
    /// `FrontendSpec::Nbd`). `export_name`: what clients may ask for (the
    /// empty default name works too).
    pub fn new(listener: OwnedFd, export_name: String) -> NbdFrontend {
        NbdFrontend {
            listener: Arc::new(listener),
            export_name,
            shared: Arc::new(Shared::default()),
        }
    }

    fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: null address pointers are allowed; the fd is ours.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new fd that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                _ => return Err(e),
            }
        }
    }
}

impl Frontend for NbdFrontend {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError> {
        let sizing = Sizing::plan(crate::sandbox::mlock::headroom());
        let ctx = Arc::new(
            ServerCtx::new(disk, sizing).map_err(|source| FrontendError::Io {
                step: "starting NBD I/O threads",
                source,
            })?,
        );
        tracing::info!(
            frontend = "nbd",
            io_threads = sizing.io_threads,
            max_clients = sizing.max_connections,
            max_block = sizing.max_payload,
            "serving {:?}: {} I/O threads, up to {} clients, max block {} bytes",
            self.export_name,
            sizing.io_threads,
            sizing.max_connections,
            sizing.max_payload
        );
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            // Like qemu-nbd's connection limit, a full server stops
            // accepting instead of refusing: further clients wait in the
            // listen backlog until one leaves (idle ones are dropped after
            // the handshake timeout). Refusing raced with a client that had
            // just been hung up on but whose thread had not ended yet.
            self.shared.wait_for_slot(sizing.max_connections);
            let fd = match self.accept() {
                Ok(fd) => fd,
                Err(_) if self.shared.stopping.load(Ordering::SeqCst) => break Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    log(format_args!("accept: {e}; retrying"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(source) => {
                    break Err(FrontendError::Io {
                        step: "accepting NBD clients",
                        source,
                    })
                }
            };
            if self.shared.stopping.load(Ordering::SeqCst) {
                break Ok(());
            }
            threads.retain(|t| !t.is_finished());
            let id = self.shared.accepted.fetch_add(1, Ordering::SeqCst);
            let sock = Arc::new(Sock::new(fd));
            self.shared
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, sock.clone());
            let (shared, ctx, name) = (self.shared.clone(), ctx.clone(), self.export_name.clone());
            match spawn_thread_sized(&format!("nbd-conn-{id}"), CONN_STACK, move || {
                client(id, &sock, &name, ctx);
                shared.leave(id);
            }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    log(format_args!("client {id}: refused, no thread: {e}"));
                    self.shared.leave(id);
                }
            }
        };
        // Stop: hang up on every client, wait for their threads, then the pool.
        for sock in self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            sock.shutdown();
        }
        for t in threads {
            let _ = t.join();
        }
        ctx.pool.shutdown();
        for lane in &ctx.paced {
            lane.shutdown();
        }
        result
    }

    fn stopper(&self) -> Option<Stopper> {
        let (shared, listener) = (self.shared.clone(), self.listener.clone());
        Some(Box::new(move || {
            shared.stopping.store(true, Ordering::SeqCst);
            // Wakes the blocked accept (it fails with EINVAL).
            // SAFETY: shutdown takes integers; the fd is kept alive by the Arc.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            for sock in shared
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                sock.shutdown();
            }
            // After the lock above: a loop that checked `stopping` before the
            // store is waiting by now and gets this.
            shared.client_left.notify_all();
        }))
    }
}

/// Negotiate with and then serve one client.
fn client(id: u64, sock: &Arc<Sock>, export_name: &str, ctx: Arc<ServerCtx>) {
    let export = ExportInfo {
        name: export_name.to_string(),
        size: ctx.disk.size(),
        read_only: ctx.disk.read_only(),
        description: "tapjail tapdisk".into(),
        max_payload: ctx.sizing.max_payload,
        bitmaps: ctx
            .disk
            .cbt()
            .map(|t| {
                t.all()
                    .iter()
                    .map(|m| (m.name().to_string(), m.id()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    if let Err(e) = sock.set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT)) {
        log(format_args!("client {id}: setting timeouts: {e}"));
        return;
    }
    let session = match handshake::negotiate(&mut &**sock, &export) {
        Ok(Outcome::Transmission(s)) => s,
        Ok(Outcome::Aborted) => return,
        Err(e) => {
            log(format_args!("client {id}: dropped during negotiation: {e}"));
            sock.shutdown();
            return;
        }
    };
    if let Err(e) = sock.set_timeouts(None, Some(SEND_TIMEOUT)) {
        log(format_args!("client {id}: setting timeouts: {e}"));
        return;
    }
    match conn::serve(sock.clone(), session, ctx) {
        Ok(End::Clean) => {}
        Ok(End::HungUp(why)) => log(format_args!("client {id}: dropped: {why}")),
        Err(e) => log(format_args!("client {id}: {e}")),
    }
}
