//! One request run against the disk on a pool thread, and its reply
//! (read data, block status extents, or an NBD error).

use super::{Conn, Reply, ServerCtx};
use crate::disk::{DiskError, IoKind};
use crate::frontend::nbd::pool::BudgetGuard;
use crate::frontend::nbd::proto::*;
use crate::io::AlignedBuf;
use std::sync::Arc;

/// The reply to a successful read of `len` bytes into `buf`.
pub(super) fn read_reply(
    conn: &Conn,
    ctx: &ServerCtx,
    handle: u64,
    offset: u64,
    len: u32,
    buf: AlignedBuf,
    guards: Vec<BudgetGuard>,
) -> Reply {
    if len == 0 && conn.session.structured {
        ctx.bufs.put(buf);
        return Reply::new(none_chunk(handle).to_vec(), guards);
    }
    let head = if conn.session.structured {
        offset_data_header(handle, offset, len).to_vec()
    } else {
        simple_reply(0, handle).to_vec()
    };
    let mut r = Reply::new(head, guards);
    r.data = Some((buf, ctx.bufs.clone()));
    r
}

fn disk_error(conn: &Conn, handle: u64, e: &DiskError, guards: Vec<BudgetGuard>) -> Reply {
    conn.error_reply(handle, nbd_error(e.errno()), &e.to_string(), guards)
}

/// Run one request on a pool thread and send its reply.
pub(super) fn execute(
    conn: &Arc<Conn>,
    ctx: &ServerCtx,
    handle: u64,
    cmd: Command,
    data: Option<AlignedBuf>,
    guards: Vec<BudgetGuard>,
) {
    let disk = &ctx.disk;
    let ok = |guards| Reply::new(simple_reply(0, handle).to_vec(), guards);
    let reply = match cmd {
        Command::Read { offset, len } => {
            let mut buf = ctx.bufs.get(len as usize);
            // Its tokens were taken when it was read off the socket.
            match disk.io_taken(IoKind::Read, len.into(), |img| {
                img.read_at(&mut buf, offset)
            }) {
                Err(e) => {
                    ctx.bufs.put(buf);
                    disk_error(conn, handle, &e, guards)
                }
                Ok(()) => read_reply(conn, ctx, handle, offset, len, buf, guards),
            }
        }
        Command::Write { offset, len, fua } => {
            let Some(buf) = data else {
                return; // unreachable by construction: the reader fills writes
            };
            let r = disk.io_taken(IoKind::Write, len.into(), |img| {
                img.write_at(&buf, offset)?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            ctx.bufs.put(buf);
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::Flush => match disk.io(IoKind::Flush, 0, |img| img.flush()) {
            Ok(()) => ok(guards),
            Err(e) => disk_error(conn, handle, &e, guards),
        },
        Command::Trim { offset, len, fua } => {
            let r = disk.io(IoKind::Discard, 0, |img| {
                img.discard(offset, len.into())?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap,
        } => {
            let r = disk.io(IoKind::Other, 0, |img| {
                img.write_zeroes(offset, len.into(), may_unmap)?;
                if fua {
                    img.flush()?;
                }
                Ok(())
            });
            match r {
                Ok(()) => ok(guards),
                Err(e) => disk_error(conn, handle, &e, guards),
            }
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let session = conn.session;
            let dirty = session.dirty_bitmap.map(|id| {
                disk.cbt()
                    .and_then(|t| t.by_id(id))
                    .map(|m| dirty_extents(&m, offset, len, req_one))
            });
            let base = session
                .base_allocation
                .then(|| disk.io(IoKind::Other, 0, |img| extents(img, offset, len, req_one)))
                .transpose();
            match (base, dirty) {
                (Err(e), _) => disk_error(conn, handle, &e, guards),
                (Ok(_), Some(None)) => Reply::new(
                    error_chunk(
                        handle,
                        NBD_EINVAL,
                        "the dirty bitmap this connection selected was stopped",
                    ),
                    guards,
                ),
                (Ok(base), dirty) => {
                    let dirty = dirty.flatten();
                    let mut b = Vec::new();
                    if let Some(ext) = &base {
                        b.extend(block_status_chunk_of(
                            handle,
                            META_BASE_ALLOCATION_ID,
                            ext,
                            dirty.is_none(),
                        ));
                    }
                    if let Some(ext) = &dirty {
                        b.extend(block_status_chunk_of(
                            handle,
                            META_DIRTY_BITMAP_ID,
                            ext,
                            true,
                        ));
                    }
                    Reply::new(b, guards)
                }
            }
        }
    };
    conn.send(reply);
}

/// `qemu:dirty-bitmap:NAME` descriptors for `[offset, offset+len)`
/// (flag [`STATE_DIRTY`] for written blocks, as qemu), merged, at most
/// [`MAX_EXTENTS`] (or one with `req_one`).
fn dirty_extents(
    map: &crate::cbt::Bitmap,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len); // checked by `decide`
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while let Some((l, dirty)) = map.extent(pos, end - pos) {
        let flags = if dirty { STATE_DIRTY } else { 0 };
        let l32 = u32::try_from(l).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += l32,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l32, flags));
            }
        }
        pos += l;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

/// `base:allocation` descriptors for `[offset, offset+len)`, merged, at
/// most [`MAX_EXTENTS`] (or one with `req_one`); they may cover less than
/// asked, as the protocol allows.
fn extents(
    img: &dyn crate::image::Image,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, crate::image::ImageError> {
    let end = offset + u64::from(len); // checked by `decide`
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let e = img.block_status(pos, end - pos)?;
        if e.len == 0 {
            break;
        }
        let l = e.len.min(end - pos);
        let flags = if e.allocated { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
        // l ≤ len, which is a u32.
        let l32 = u32::try_from(l).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += l32,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l32, flags));
            }
        }
        pos += l;
    }
    if out.is_empty() {
        out.push((len, 0)); // "unknown" is always a valid answer
    }
    Ok(out)
}
