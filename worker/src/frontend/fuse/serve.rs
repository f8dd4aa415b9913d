//! The serving threads: each reads one request from `/dev/fuse`, serves
//! it on the one-file filesystem (or hands a paced write to its throttle
//! lane) and writes the reply.

use super::buf::IoBuf;
use super::fs::{Outcome, Pace};
use super::lanes::Job;
use crate::disk::IoKind;
use crate::frontend::FrontendError;

use super::request::{Op, Request};
use super::{abi, dev, fs, lanes, request, Shared};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

pub(super) fn serve_thread(shared: &Shared<'_>, small: &mut IoBuf) {
    let waiter = match dev::Waiter::new(shared.dev, shared.stop.efd.as_fd()) {
        Ok(w) => w,
        Err(source) => {
            shared.fail(FrontendError::Io {
                step: "epoll for /dev/fuse",
                source,
            });
            return;
        }
    };
    let pool = &shared.stop.pool;
    while let Some(mut big) = pool.take() {
        let result = match read_request(shared, &waiter, &mut big) {
            Some(n) => serve_request(shared, big, small, n),
            None => {
                pool.put(big);
                Ok(())
            }
        };
        if let Err(e) = result {
            shared.fail(e);
        }
    }
}

/// Read one request into `big`; `None` when there is none to serve (the
/// connection is gone, stopping, or an interrupted read).
pub(super) fn read_request(
    shared: &Shared<'_>,
    waiter: &dev::Waiter,
    big: &mut IoBuf,
) -> Option<usize> {
    loop {
        if shared.stop.stopped() {
            return None;
        }
        match dev::read(shared.dev, big.request_area()) {
            // /dev/fuse never returns 0; a socket standing in for it does
            // when its peer is gone.
            Ok(0) => shared.stop.stop(),
            Ok(n) => return Some(n),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => {
                    if let Err(source) = shared.stop.pool.polling(|| waiter.wait()) {
                        shared.fail(FrontendError::Io {
                            step: "epoll_wait on /dev/fuse",
                            source,
                        });
                    }
                }
                // A signal, or a request interrupted before we got it.
                Some(libc::EINTR) | Some(libc::ENOENT) => {}
                // Unmounted or aborted: the kernel side is gone.
                Some(libc::ENODEV) | Some(libc::ECONNABORTED) => shared.stop.stop(),
                _ => shared.fail(FrontendError::Io {
                    step: "read /dev/fuse",
                    source: e,
                }),
            },
        }
    }
}

/// What a request read into a big buffer needs once that buffer is given
/// back: a small READ or WRITE copied out, or nothing (served in place).
enum Small {
    Read {
        unique: u64,
        read: request::ReadIn,
    },
    Write {
        unique: u64,
        node: u64,
        offset: u64,
        len: usize,
    },
}

/// Serve the request of `n` bytes in `big`, giving `big` back to the pool
/// as soon as the request no longer needs it.
pub(super) fn serve_request(
    shared: &Shared<'_>,
    mut big: IoBuf,
    small: &mut IoBuf,
    n: usize,
) -> Result<(), FrontendError> {
    let copied = match request::parse(big.request(n)) {
        Ok(Request {
            header,
            op: Op::Read(read),
        }) if header.nodeid == fs::FILE_ID && read.size as usize <= small.cap() => {
            Some(Small::Read {
                unique: header.unique,
                read,
            })
        }
        Ok(Request {
            header,
            op: Op::Write { offset, data },
        }) if data.len() <= small.cap() => {
            small.data_area()[..data.len()].copy_from_slice(data);
            Some(Small::Write {
                unique: header.unique,
                node: header.nodeid,
                offset,
                len: data.len(),
            })
        }
        _ => None,
    };
    let Some(copied) = copied else {
        let r = process(shared, &mut big, n);
        shared.stop.pool.put(big);
        return r;
    };
    shared.stop.pool.put(big);
    let disk = shared.fs.disk();
    match copied {
        Small::Read { unique, read } => {
            // Out of tokens: to the read lane, unless it cannot take it.
            if let Some(due) = disk.take_tokens(IoKind::Read, shared.fs.read_len(&read)) {
                match shared
                    .lanes
                    .submit(lanes::READS, Job::Read { unique, read, due })
                {
                    Ok(()) => return Ok(()),
                    Err(_) => disk.pace_until(due),
                }
            }
            read_reply(shared, unique, &read, small)
        }
        Small::Write {
            unique,
            node,
            offset,
            len,
        } => {
            if let Some(errno) = shared.fs.write_refusal(node, offset, len as u64) {
                return reply(shared, unique, errno, &[]);
            }
            if let Some(due) = disk.take_tokens(IoKind::Write, len as u64) {
                // The payload goes to the write lane in a spare slot.
                match shared.lanes.take_spare() {
                    Some(mut slot) if len <= slot.cap() => {
                        slot.data_area()[..len].copy_from_slice(&small.data_area()[..len]);
                        let job = Job::Write {
                            unique,
                            node,
                            offset,
                            len,
                            buf: slot,
                            due,
                        };
                        match shared.lanes.submit(lanes::WRITES, job) {
                            Ok(()) => return Ok(()),
                            Err(job) => {
                                if let Job::Write { buf, .. } = job {
                                    shared.lanes.put_spare(buf);
                                }
                                disk.pace_until(due);
                            }
                        }
                    }
                    Some(slot) => {
                        shared.lanes.put_spare(slot);
                        disk.pace_until(due);
                    }
                    None => disk.pace_until(due),
                }
            }
            write_reply(shared, unique, node, offset, &small.data_area()[..len])
        }
    }
}

/// Serve a READ whose tokens were taken and waited for; reply.
pub(super) fn read_reply(
    shared: &Shared<'_>,
    unique: u64,
    read: &request::ReadIn,
    buf: &mut IoBuf,
) -> Result<(), FrontendError> {
    let data = buf.data_area();
    match shared.fs.read_paced(read, data, Pace::Taken) {
        Ok(len) => reply(shared, unique, 0, &data[..len]),
        Err(errno) => reply(shared, unique, errno, &[]),
    }
}

/// Serve a WRITE whose tokens were taken and waited for; reply.
pub(super) fn write_reply(
    shared: &Shared<'_>,
    unique: u64,
    node: u64,
    offset: u64,
    data: &[u8],
) -> Result<(), FrontendError> {
    match shared.fs.write_paced(node, offset, data, Pace::Taken) {
        Outcome::Ok(p) => reply(shared, unique, 0, p.bytes()),
        Outcome::Err(errno) => reply(shared, unique, errno, &[]),
        _ => reply(shared, unique, libc::EIO, &[]),
    }
}

/// Handle one request of `n` bytes in `buf` and send its reply.
pub(super) fn process(shared: &Shared<'_>, buf: &mut IoBuf, n: usize) -> Result<(), FrontendError> {
    shared.fs.disk().counters.kick_in();
    let (unique, outcome) = match request::parse(buf.request(n)) {
        Ok(req) => (req.header.unique, shared.fs.handle(&req)),
        Err(e) => {
            shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
            match e {
                request::ParseError::BadArgument { unique, opcode, .. }
                    if request::expects_reply(opcode) =>
                {
                    (unique, Outcome::Err(libc::EINVAL))
                }
                // No usable header: nothing can be answered.
                _ => return Ok(()),
            }
        }
    };
    match outcome {
        Outcome::Ok(p) => reply(shared, unique, 0, p.bytes()),
        Outcome::Err(errno) => reply(shared, unique, errno, &[]),
        Outcome::None => Ok(()),
        Outcome::Read(r) => {
            let data = buf.data_area();
            match shared.fs.read(&r, data) {
                Ok(len) => reply(shared, unique, 0, &data[..len]),
                Err(errno) => reply(shared, unique, errno, &[]),
            }
        }
        Outcome::Initialized(p) => {
            reply(shared, unique, 0, p.bytes())?;
            shared.initialized.store(true, Ordering::SeqCst);
            Ok(())
        }
        Outcome::InitRefused(errno) => {
            reply(shared, unique, errno, &[])?;
            Err(FrontendError::Unavailable(format!(
                "fuse: kernel protocol older than 7.{} is not supported",
                abi::MIN_KERNEL_MINOR
            )))
        }
    }
}

/// Send one reply: `errno` 0 for success with `payload`.
pub(super) fn reply(
    shared: &Shared<'_>,
    unique: u64,
    errno: i32,
    payload: &[u8],
) -> Result<(), FrontendError> {
    let payload = if errno == 0 { payload } else { &[] };
    let len = abi::OUT_HEADER_LEN + payload.len(); // payload <= MAX_READ
    let mut h = [0u8; abi::OUT_HEADER_LEN];
    abi::Writer::new(&mut h)
        .u32(0, len as u32)
        .i32(4, -errno)
        .u64(8, unique);
    match dev::writev(shared.dev, &[&h, payload]) {
        Ok(_) => {
            shared.fs.disk().counters.kick_out();
            Ok(())
        }
        Err(e) => match e.raw_os_error() {
            // The request was interrupted or aborted meanwhile.
            Some(libc::ENOENT) => Ok(()),
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => {
                shared.stop.stop();
                Ok(())
            }
            _ => Err(FrontendError::Io {
                step: "write /dev/fuse reply",
                source: e,
            }),
        },
    }
}
