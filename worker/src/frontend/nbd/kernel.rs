//! Serving the kernel's own nbd client (`/dev/nbdN`): the broker connected
//! the device to socketpairs over netlink and handed us the other ends.
//!
//! The kernel skips negotiation: it was told the size and flags by the
//! broker, and sends requests from the first byte. So each socket goes
//! straight to the transmission phase ([`super::conn::serve`]) with the
//! session the broker announced (simple replies, no structured ones: the
//! kernel client never asks for them). One connection per socket, one
//! shared I/O pool, as for ordinary NBD clients.

use super::conn::{self, End, ServerCtx, SEND_TIMEOUT};
use super::proto::{Session, MAX_PAYLOAD};
use super::server::log;
use super::sizing::{Sizing, CONN_STACK};
use super::sock::Sock;
use crate::disk::Disk;
use crate::frontend::{spawn_thread_sized, Frontend, FrontendError, Stopper};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most kernel connections one device may have (the broker asks for one
/// per queue; the kernel has no hard limit, our threads do).
pub const MAX_CONNECTIONS: usize = 16;

/// What the broker told the kernel, and so what the kernel will send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelExport {
    pub size: u64,
    pub read_only: bool,
    /// The largest READ/WRITE the kernel sends (its queue's max_sectors).
    pub max_io_bytes: u32,
}

/// The frontend: one transmission-phase connection per socket.
#[derive(Debug)]
pub struct KernelNbdFrontend {
    socks: Vec<Arc<Sock>>,
    export: KernelExport,
    stopping: Arc<AtomicBool>,
    exit_when_dropped: bool,
}

impl KernelNbdFrontend {
    /// `socks`: the worker's ends of the socketpairs the kernel holds the
    /// other ends of (fds of `FrontendSpec::NbdKernel`).
    pub fn new(socks: Vec<OwnedFd>, export: KernelExport) -> Result<Self, FrontendError> {
        if socks.is_empty() || socks.len() > MAX_CONNECTIONS {
            return Err(FrontendError::Protocol(format!(
                "nbd-kernel needs 1 to {MAX_CONNECTIONS} sockets, got {}",
                socks.len()
            )));
        }
        if export.max_io_bytes < 4096 || export.max_io_bytes > MAX_PAYLOAD {
            return Err(FrontendError::Protocol(format!(
                "nbd-kernel: a largest request of {} bytes is outside 4096..={MAX_PAYLOAD}",
                export.max_io_bytes
            )));
        }
        Ok(KernelNbdFrontend {
            socks: socks
                .into_iter()
                .map(|fd| Arc::new(Sock::new(fd)))
                .collect(),
            export,
            stopping: Arc::new(AtomicBool::new(false)),
            exit_when_dropped: false,
        })
    }

    /// Exit the process when the kernel drops a connection we were not
    /// told to stop (its request timeout fired on a slow request: it
    /// shuts the socket down and waits for a reconfigure). Exiting makes
    /// the broker respawn us and move the device onto fresh sockets, the
    /// same path as a crash; staying would leave the device waiting until
    /// its dead-connection timeout fails its I/O.
    pub fn exit_when_dropped(mut self) -> Self {
        self.exit_when_dropped = true;
        self
    }

    fn session(&self, sizing: &Sizing) -> Session {
        Session {
            size: self.export.size,
            read_only: self.export.read_only,
            structured: false,
            base_allocation: false,
            // The kernel client negotiates no meta context.
            dirty_bitmap: None,
            max_payload: sizing.max_payload,
        }
    }
}

impl Frontend for KernelNbdFrontend {
    fn kind(&self) -> &'static str {
        "nbd-kernel"
    }

    fn serve(&mut self, disk: Arc<Disk>) -> Result<(), FrontendError> {
        if disk.size() != self.export.size {
            // The broker derived the size from our own `Opened`; a mismatch
            // means the image changed under us, and the kernel would address
            // sectors we do not have.
            return Err(FrontendError::Protocol(format!(
                "nbd-kernel: the kernel was told {} bytes but the disk has {}",
                self.export.size,
                disk.size()
            )));
        }
        let sizing = Sizing::plan(crate::sandbox::mlock::headroom())
            .with_min_payload(self.export.max_io_bytes);
        let session = self.session(&sizing);
        let ctx = Arc::new(
            ServerCtx::new(disk, sizing).map_err(|source| FrontendError::Io {
                step: "starting NBD I/O threads",
                source,
            })?,
        );
        log(format_args!(
            "serving the kernel nbd client on {} connection(s): {} I/O threads, \
             requests up to {} bytes",
            self.socks.len(),
            sizing.io_threads,
            session.max_payload
        ));
        let mut threads = Vec::new();
        for (i, sock) in self.socks.iter().enumerate() {
            if let Err(source) = sock.set_timeouts(None, Some(SEND_TIMEOUT)) {
                log(format_args!(
                    "kernel connection {i}: setting timeouts: {source}"
                ));
            }
            let (sock, conn_ctx) = (sock.clone(), ctx.clone());
            let (stopping, exit) = (self.stopping.clone(), self.exit_when_dropped);
            let t = spawn_thread_sized(&format!("nbd-kern-{i}"), CONN_STACK, move || {
                let how = match conn::serve(sock, session, conn_ctx) {
                    Ok(End::Clean) => "closed by the kernel".to_string(),
                    Ok(End::HungUp(why)) => format!("dropped: {why}"),
                    Err(e) => e.to_string(),
                };
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                log(format_args!("kernel connection {i}: {how}"));
                if exit {
                    log(format_args!(
                        "exiting so that the broker moves the device to a fresh worker"
                    ));
                    std::process::exit(75);
                }
            });
            match t {
                Ok(t) => threads.push(t),
                Err(source) => {
                    for s in &self.socks {
                        s.shutdown();
                    }
                    for t in threads {
                        let _ = t.join();
                    }
                    ctx.pool.shutdown();
                    return Err(FrontendError::Io {
                        step: "starting a kernel nbd connection thread",
                        source,
                    });
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
        ctx.pool.shutdown();
        Ok(())
    }

    fn stopper(&self) -> Option<Stopper> {
        let (stopping, socks) = (self.stopping.clone(), self.socks.clone());
        Some(Box::new(move || {
            stopping.store(true, Ordering::SeqCst);
            for s in &socks {
                s.shutdown();
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::proto::{
        CMD_FLUSH, CMD_READ, CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    };
    use crate::image::raw::RawImage;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// A simple reply: (error, handle).
    fn reply(s: &mut UnixStream) -> (u32, u64) {
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(
            &r[..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic"
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn disk(size: u64, read_only: bool) -> (tempfile::NamedTempFile, Arc<Disk>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", read_only).unwrap();
        (f, Disk::new(Arc::new(img)))
    }

    fn export(size: u64, read_only: bool) -> KernelExport {
        KernelExport {
            size,
            read_only,
            max_io_bytes: 128 << 10,
        }
    }

    #[test]
    fn kernel_mode_serves_transmission_from_the_first_byte_on_every_socket() {
        let size = 1u64 << 20;
        let (_f, disk) = disk(size, false);
        let (k0, w0) = UnixStream::pair().unwrap();
        let (k1, w1) = UnixStream::pair().unwrap();
        let mut f = KernelNbdFrontend::new(
            vec![OwnedFd::from(w0), OwnedFd::from(w1)],
            export(size, false),
        )
        .unwrap();
        let stop = f.stopper().unwrap();
        let server = std::thread::spawn(move || f.serve(disk));
        // No greeting: the first bytes on the wire are our requests.
        let (mut k0, mut k1) = (k0, k1);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut w = request(CMD_WRITE, 7, 4096, 8192);
        w.extend_from_slice(&data);
        k0.write_all(&w).unwrap();
        assert_eq!(reply(&mut k0), (0, 7));
        k1.write_all(&request(CMD_FLUSH, 8, 0, 0)).unwrap();
        assert_eq!(reply(&mut k1), (0, 8));
        // Written on one connection, read back on the other.
        k1.write_all(&request(CMD_READ, 9, 4096, 8192)).unwrap();
        assert_eq!(reply(&mut k1), (0, 9));
        let mut back = vec![0u8; 8192];
        k1.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        // Past the end: EINVAL, the connection lives on.
        k0.write_all(&request(CMD_READ, 10, size, 512)).unwrap();
        assert_eq!(reply(&mut k0), (libc::EINVAL as u32, 10));
        stop();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn kernel_mode_read_only_refuses_writes_with_eperm() {
        let size = 1u64 << 20;
        let (_f, disk) = disk(size, true);
        let (mut k, w) = UnixStream::pair().unwrap();
        let mut f = KernelNbdFrontend::new(vec![OwnedFd::from(w)], export(size, true)).unwrap();
        let server = std::thread::spawn(move || f.serve(disk));
        let mut req = request(CMD_WRITE, 1, 0, 512);
        req.extend_from_slice(&[0xff; 512]);
        k.write_all(&req).unwrap();
        assert_eq!(reply(&mut k), (libc::EPERM as u32, 1));
        // The kernel hanging up ends serve cleanly.
        drop(k);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn kernel_mode_refuses_a_size_other_than_the_disks_and_bad_geometry() {
        let (_f, disk) = disk(1 << 20, false);
        let (_k, w) = UnixStream::pair().unwrap();
        let mut f = KernelNbdFrontend::new(vec![OwnedFd::from(w)], export(2 << 20, false)).unwrap();
        let e = f.serve(disk).unwrap_err().to_string();
        assert!(e.contains("the kernel was told 2097152 bytes"), "{e}");
        assert!(KernelNbdFrontend::new(Vec::new(), export(1, false)).is_err());
        let (_k, w) = UnixStream::pair().unwrap();
        let mut bad = export(1, false);
        bad.max_io_bytes = MAX_PAYLOAD + 1;
        assert!(KernelNbdFrontend::new(vec![OwnedFd::from(w)], bad).is_err());
    }
}
