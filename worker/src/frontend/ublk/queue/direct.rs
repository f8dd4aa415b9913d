//! The direct path: a request the image maps onto its files becomes
//! READ/WRITE SQEs on this ring straight into the tag's buffer (or an
//! inline `pwrite` for buffered files); the tag is committed when its
//! last piece completes.

use super::{push, user_data, Direct, Files, Plan, Queue, Slot, FIRST_IMAGE_SLOT, KIND_IO};
use crate::disk::Ticket;
use crate::frontend::ublk::request::Request;
use crate::frontend::FrontendError;
use crate::image::direct::{MAX_DIRECT_FILES, MAX_SEGMENTS};
use crate::image::{DirectFile, Target};
use io_uring::{opcode, types};
use std::os::fd::RawFd;

impl<'d> Queue<'_, 'd> {
    /// Whether (and how) the request can be served on the ring.
    pub(super) fn plan(&mut self, ticket: &Ticket<'d>, req: &Request) -> Option<Plan> {
        let img = ticket.image();
        match *req {
            Request::Read { offset, len } | Request::Write { offset, len, .. } => {
                let write = matches!(req, Request::Write { .. });
                let m = img.map_direct(offset, len as u64, write)?;
                let files = self.files_for(ticket)?;
                let fits = m.segments().iter().all(|s| match s.target {
                    Target::Zero => true,
                    Target::File { file, offset } => files.get(file).is_some_and(|f| {
                        // Tag buffers are page aligned and pieces whole
                        // sectors; check rather than trust.
                        !f.o_direct || (offset | s.len) & 511 == 0
                    }),
                });
                fits.then_some(Plan::Rw(m))
            }
            Request::Flush => {
                let sync = img.direct_sync()?;
                if sync.0 != 0 {
                    let n = self.files_for(ticket)?.len();
                    if sync.iter().any(|i| i >= n) {
                        return None;
                    }
                }
                Some(Plan::Sync(sync))
            }
            _ => None,
        }
    }

    /// The image files of the ticket's image, registered in the ring
    /// (`None`: it has none, or they could not be registered).
    fn files_for(&mut self, ticket: &Ticket<'d>) -> Option<&[DirectFile]> {
        let generation = ticket.generation();
        if self.files.generation != Some(generation) {
            // A new generation exists only after a pause drained every
            // request of the previous image, so no I/O of ours is still
            // using the slots we replace (and in-flight I/O holds its own
            // reference to its file anyway).
            let mut files = ticket.image().direct_files();
            let mut fds = [-1; MAX_DIRECT_FILES];
            if files.len() > MAX_DIRECT_FILES {
                files.clear();
            }
            for (slot, f) in fds.iter_mut().zip(&files) {
                *slot = f.fd;
            }
            if let Err(e) = self
                .ring
                .submitter()
                .register_files_update(FIRST_IMAGE_SLOT, &fds)
            {
                tracing::warn!(
                    frontend = "ublk",
                    queue = self.q.q_id,
                    "ublk queue {}: image files not registered with the ring ({e}); serving through the engine",
                    self.q.q_id
                );
                files.clear();
            }
            self.files = Files {
                generation: Some(generation),
                files,
            };
        }
        (!self.files.files.is_empty()).then_some(&self.files.files[..])
    }

    pub(super) fn submit_direct(
        &mut self,
        tag: u16,
        req: Request,
        ticket: Ticket<'d>,
        plan: Plan,
    ) -> Result<(), FrontendError> {
        let mut d = Direct {
            ticket,
            req,
            mapping: None,
            pending: 0,
            done: [0; MAX_SEGMENTS],
            error: None,
        };
        match plan {
            Plan::Rw(m) => {
                let fua = matches!(req, Request::Write { fua: true, .. });
                let mut at = 0usize;
                for (piece, seg) in m.segments().iter().enumerate() {
                    let len = seg.len as usize;
                    match seg.target {
                        Target::Zero => {
                            if let Some(b) = self.bufs.get_mut(tag, at + len) {
                                b[at..].fill(0);
                            }
                        }
                        Target::File { file, offset } => {
                            let f = self.files.files[file];
                            if m.is_write() && !f.o_direct && !fua {
                                let Some(b) = self.bufs.get_mut(tag, at + len) else {
                                    d.error.get_or_insert(-libc::EINVAL);
                                    break;
                                };
                                if let Err(e) = pwrite_all(f.fd, &b[at..], offset) {
                                    d.error
                                        .get_or_insert(-e.raw_os_error().unwrap_or(libc::EIO));
                                    break;
                                }
                                d.done[piece] = seg.len;
                            } else {
                                self.push_rw(tag, piece, file, m.is_write(), fua, at, len, offset)?;
                                d.pending += 1;
                            }
                        }
                    }
                    at += len;
                }
                d.mapping = Some(m);
            }
            Plan::Sync(files) => {
                for (piece, file) in files.iter().enumerate() {
                    let sqe = opcode::Fsync::new(image_slot(file))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(user_data(KIND_IO, tag, piece));
                    // SAFETY: fsync points at no memory.
                    unsafe { push(&mut self.ring, &sqe) }?;
                    d.pending += 1;
                }
            }
        }
        if d.pending == 0 {
            return self.finish(tag, d);
        }
        self.slots[usize::from(tag)] = Slot::Direct(d);
        self.direct_inflight += 1;
        Ok(())
    }

    /// Queue a READ or WRITE of `len` bytes of the tag's buffer from `at`.
    #[allow(clippy::too_many_arguments)]
    fn push_rw(
        &mut self,
        tag: u16,
        piece: usize,
        file: usize,
        write: bool,
        fua: bool,
        at: usize,
        len: usize,
        offset: u64,
    ) -> Result<(), FrontendError> {
        let addr = (self.bufs.addr(tag) as usize + at) as *mut u8;
        let len = u32::try_from(len)
            .map_err(|_| FrontendError::Protocol(format!("ublk request piece of {len} bytes")))?;
        let ud = user_data(KIND_IO, tag, piece);
        let sqe = if write {
            opcode::Write::new(image_slot(file), addr, len)
                .offset(offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build()
        } else {
            opcode::Read::new(image_slot(file), addr, len)
                .offset(offset)
                .build()
        };
        // SAFETY: the range lies inside the tag's buffer (pieces add up to
        // the request, which fits the buffer), owned by this queue until
        // the commit, and the buffers outlive the ring (see `run`).
        unsafe { push(&mut self.ring, &sqe.user_data(ud)) }
    }

    pub(super) fn on_image_io(
        &mut self,
        tag: u16,
        piece: usize,
        res: i32,
    ) -> Result<(), FrontendError> {
        let Some(Slot::Direct(d)) = self.slots.get_mut(usize::from(tag)) else {
            return Ok(()); // not ours: nothing to do
        };
        if res < 0 {
            d.error.get_or_insert(res);
        } else if let Some(m) = &d.mapping {
            let seg = m.segments()[piece.min(m.segments().len() - 1)];
            let got = u64::try_from(res).unwrap_or(0);
            d.done[piece] += got;
            if got == 0 {
                // End of file inside a mapped range: the image is broken.
                d.error.get_or_insert(-libc::EIO);
            } else if d.done[piece] < seg.len {
                // Short transfer: queue the rest.
                let Target::File { file, offset } = seg.target else {
                    return Ok(());
                };
                let at = m.segments()[..piece].iter().map(|s| s.len).sum::<u64>() + d.done[piece];
                let fua = matches!(d.req, Request::Write { fua: true, .. });
                let write = m.is_write();
                let left = (seg.len - d.done[piece]) as usize;
                let off = offset + d.done[piece];
                return self.push_rw(tag, piece, file, write, fua, at as usize, left, off);
            }
        }
        d.pending -= 1;
        if d.pending > 0 {
            return Ok(());
        }
        let Slot::Direct(d) = std::mem::replace(&mut self.slots[usize::from(tag)], Slot::Idle)
        else {
            return Ok(());
        };
        self.direct_inflight -= 1;
        self.finish(tag, d)
    }

    /// Every piece is done: account, release the ticket, commit.
    fn finish(&mut self, tag: u16, d: Direct<'d>) -> Result<(), FrontendError> {
        let Direct {
            ticket,
            req,
            mapping,
            error,
            ..
        } = d;
        let ok = error.is_none();
        self.served_direct += 1;
        if let Some(m) = &mapping {
            ticket.image().direct_done(m, ok);
        }
        drop(mapping); // unpin before the ticket lets a pause proceed
        let (kind, bytes) = req.accounting();
        ticket.finish(kind, bytes, ok);
        let result = match error {
            None => req.done_value(),
            Some(e) => e.min(-1),
        };
        self.commit(tag, result)
    }
}

fn image_slot(file: usize) -> types::Fixed {
    types::Fixed(FIRST_IMAGE_SLOT + file as u32)
}

/// `pwrite` until done (a buffered write to a regular file).
fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let off =
            i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: buf is valid for reads of its length for the call; fd is
        // an image file the image keeps open while its ticket lives.
        let n = unsafe { libc::pwrite64(fd, buf.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}
