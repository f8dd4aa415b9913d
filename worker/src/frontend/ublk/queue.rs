//! One ublk hardware queue, served by one thread with its own io_uring.
//!
//! The driver binds a queue to the task that fetched its tags (commands
//! from any other thread are refused), so this thread does everything:
//! FETCH_REQ for every tag, then for each completion run the request and
//! answer with COMMIT_AND_FETCH_REQ, until the driver aborts the tags
//! (STOP_DEV) or we are told to stop.
//!
//! Data moves through plain per-tag buffers given with FETCH: the driver
//! copies a WRITE's data into the buffer before handing us the request and
//! copies a READ's data out when we commit. On 6.12 zero copy is not
//! offered, and `UBLK_F_USER_COPY` would add a pread/pwrite on the char
//! device per request (and those syscalls to the seccomp filter) for no
//! saving, as the data is copied once either way.
//!
//! The ring is restricted like a seccomp filter: created disabled, with
//! the char device as its only registered file, then limited to
//! `IORING_OP_URING_CMD` on registered files before it is enabled.

use super::mem::{DescArray, IoBuffers};
use super::request;
use crate::disk::Disk;
use crate::frontend::FrontendError;
use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;
use tapjail_common::ublk_abi::*;

/// How often an idle queue looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(500);

/// The fixed-file slot of `/dev/ublkcN` in every queue ring.
const CHAR_FILE: types::Fixed = types::Fixed(0);

/// What a queue thread needs.
#[derive(Debug, Clone, Copy)]
pub struct QueueParams {
    pub q_id: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> FrontendError {
    move |source| FrontendError::Io { step, source }
}

/// A ring that can do nothing but queue commands on the char device.
fn restricted_ring(
    char_fd: BorrowedFd<'_>,
    depth: u16,
) -> Result<IoUring<squeue::Entry, cqueue::Entry>, FrontendError> {
    // Only this thread ever submits, and it collects completions only when
    // it waits: task work (the driver hands requests over through it) then
    // runs in batches at that point instead of interrupting request
    // handling (SINGLE_ISSUER + DEFER_TASKRUN, Linux 6.1+). The ring is
    // enabled by the calling (queue) thread, which makes it the issuer.
    let ring = IoUring::<squeue::Entry, cqueue::Entry>::builder()
        .setup_r_disabled()
        .setup_cqsize(u32::from(depth) * 2)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(u32::from(depth))
        .map_err(io("io_uring_setup for a ublk queue"))?;
    let sub = ring.submitter();
    sub.register_files(&[char_fd.as_raw_fd()])
        .map_err(io("register /dev/ublkcN with the queue ring"))?;
    let fixed = squeue::Flags::FIXED_FILE.bits();
    sub.register_restrictions(&mut [
        Restriction::sqe_op(opcode::UringCmd16::CODE),
        Restriction::sqe_flags_allowed(fixed),
        Restriction::sqe_flags_required(fixed),
    ])
    .map_err(io("io_uring restrictions for a ublk queue"))?;
    sub.register_enable_rings()
        .map_err(io("enable the ublk queue ring"))?;
    Ok(ring)
}

fn queue_cmd(op: u32, q: &QueueParams, tag: u16, result: i32, addr: u64) -> squeue::Entry {
    let cmd = UblksrvIoCmd {
        q_id: q.q_id,
        tag,
        result,
        addr,
    };
    opcode::UringCmd16::new(CHAR_FILE, op)
        .cmd(cmd.to_bytes())
        .build()
        .user_data(u64::from(tag))
}

fn push(
    ring: &mut IoUring<squeue::Entry, cqueue::Entry>,
    sqe: &squeue::Entry,
) -> Result<(), FrontendError> {
    // SAFETY: the only user memory the command references is the tag's
    // buffer, which lives in `IoBuffers` for as long as the ring (the ring
    // is dropped first: it is declared after the buffers in `run`).
    if unsafe { ring.submission().push(sqe) }.is_err() {
        // Cannot happen: each tag has at most one command queued and the
        // ring has a slot per tag. Submit and retry rather than lose it.
        ring.submit().map_err(io("io_uring_enter (ublk queue)"))?;
        // SAFETY: as above.
        unsafe { ring.submission().push(sqe) }
            .map_err(|_| FrontendError::Protocol("ublk queue ring is full".into()))?;
    }
    Ok(())
}

/// Serve one queue until every tag is aborted or `stop` is set. Reports
/// on `ready` once all tags are fetched (or why they could not be).
pub fn run(
    char_fd: BorrowedFd<'_>,
    q: QueueParams,
    disk: &Disk,
    stop: &AtomicBool,
    ready: Sender<Result<(), FrontendError>>,
) -> Result<(), FrontendError> {
    let setup = (|| {
        let descs = DescArray::map(char_fd, q.q_id, q.depth)
            .map_err(io("mmap the ublk descriptor array"))?;
        let bufs =
            IoBuffers::new(q.depth, q.max_io_bytes).map_err(io("allocate ublk request buffers"))?;
        let mut ring = restricted_ring(char_fd, q.depth)?;
        for tag in 0..q.depth {
            let sqe = queue_cmd(UBLK_U_IO_FETCH_REQ, &q, tag, 0, bufs.addr(tag));
            push(&mut ring, &sqe)?;
        }
        ring.submit()
            .map_err(io("io_uring_enter (ublk FETCH_REQ)"))?;
        // A refused FETCH completes at once; a good one stays pending.
        let early: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        if let Some(&(_, res)) = early.iter().find(|(_, res)| *res < 0) {
            return Err(FrontendError::Io {
                step: "ublk FETCH_REQ",
                source: std::io::Error::from_raw_os_error(-res),
            });
        }
        Ok((descs, bufs, ring, early))
    })();
    let (descs, mut bufs, mut ring, early) = match setup {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(FrontendError::Protocol(format!(
                "queue {} not started: {msg}",
                q.q_id
            )));
        }
    };

    let mut live = usize::from(q.depth);
    let mut done = early;
    let result = 'serve: loop {
        for &(user_data, res) in &done {
            let Ok(tag) = u16::try_from(user_data) else {
                continue;
            };
            match res {
                UBLK_IO_RES_OK => {
                    let result = match descs
                        .get(tag)
                        .ok_or(-libc::EINVAL)
                        .and_then(|d| request::decode(&d, q.max_io_bytes))
                    {
                        Ok(req) => match bufs.get_mut(tag, q.max_io_bytes as usize) {
                            Some(buf) => request::execute(disk, req, buf),
                            None => -libc::EINVAL,
                        },
                        Err(errno) => errno,
                    };
                    let sqe = queue_cmd(
                        UBLK_U_IO_COMMIT_AND_FETCH_REQ,
                        &q,
                        tag,
                        result,
                        bufs.addr(tag),
                    );
                    if let Err(e) = push(&mut ring, &sqe) {
                        break 'serve Err(e);
                    }
                }
                UBLK_IO_RES_ABORT => live = live.saturating_sub(1),
                other => {
                    // The driver refused a command: that tag's request can
                    // neither complete nor be re-fetched. Only a new server
                    // (after recovery) can get the queue going again.
                    break 'serve Err(FrontendError::Protocol(format!(
                        "ublk queue {} tag {tag}: the driver refused a queue command: {}",
                        q.q_id,
                        std::io::Error::from_raw_os_error(-other.min(-1))
                    )));
                }
            }
        }
        if live == 0 {
            break Ok(());
        }
        if stop.load(Ordering::Relaxed) {
            // Commits queued since the last wait must reach the driver, or
            // their requests would be re-issued to a successor for nothing.
            // Then dropping the ring hands the queue back to the driver.
            break ring
                .submit()
                .map(|_| ())
                .map_err(io("io_uring_enter (ublk commit)"));
        }
        let ts = types::Timespec::from(STOP_POLL);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => break Err(io("io_uring_enter (ublk queue)")(e)),
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    };
    drop(ring);
    if live > 0 {
        // The driver still holds fetches pointing into the buffers and
        // cancels them only asynchronously after the ring is gone; if the
        // buffers were unmapped and the addresses reused, request data
        // could land in unrelated memory. Leak them instead.
        std::mem::forget(bufs);
    }
    result
}
