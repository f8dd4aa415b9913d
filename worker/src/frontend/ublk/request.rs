//! One ublk request: decoded from the driver's descriptor, run against the
//! disk, answered with the value COMMIT_AND_FETCH carries back.

use crate::disk::{Disk, DiskError, IoKind, Ticket};
use crate::image::{Image, ImageError};
use tapjail_common::ublk_abi::*;

/// What the driver asks for, with byte offsets and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: usize,
    },
    /// `fua`: durable before completion.
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

/// Turn a descriptor into a request, or the negative errno to answer it
/// with. `max_io` is the tag buffer's size; READ/WRITE never exceed it.
pub fn decode(desc: &UblksrvIoDesc, max_io: u32) -> Result<Request, i32> {
    // Not for FLUSH, whose start sector is the block layer's "none" (-1).
    let offset = || desc.start_sector.checked_mul(512).ok_or(-libc::EINVAL);
    let len = u64::from(desc.nr_sectors) * 512;
    let flags = desc.flags();
    let data_len = || -> Result<usize, i32> {
        if len == 0 || len > u64::from(max_io) {
            return Err(-libc::EINVAL);
        }
        usize::try_from(len).map_err(|_| -libc::EINVAL)
    };
    match desc.op() {
        UBLK_IO_OP_READ => Ok(Request::Read {
            offset: offset()?,
            len: data_len()?,
        }),
        UBLK_IO_OP_WRITE => Ok(Request::Write {
            offset: offset()?,
            len: data_len()?,
            fua: flags & UBLK_IO_F_FUA != 0,
        }),
        UBLK_IO_OP_FLUSH => Ok(Request::Flush),
        UBLK_IO_OP_DISCARD => Ok(Request::Discard {
            offset: offset()?,
            len,
        }),
        UBLK_IO_OP_WRITE_ZEROES => Ok(Request::WriteZeroes {
            offset: offset()?,
            len,
            may_unmap: flags & UBLK_IO_F_NOUNMAP == 0,
        }),
        _ => Err(-libc::EOPNOTSUPP),
    }
}

impl Request {
    /// For stats: what kind of request, and its data bytes.
    pub fn accounting(&self) -> (IoKind, u64) {
        match *self {
            Request::Read { len, .. } => (IoKind::Read, len as u64),
            Request::Write { len, .. } => (IoKind::Write, len as u64),
            Request::Flush => (IoKind::Flush, 0),
            Request::Discard { .. } => (IoKind::Discard, 0),
            _ => (IoKind::Other, 0),
        }
    }

    /// What a successful request answers: bytes for READ/WRITE, else 0.
    pub fn done_value(&self) -> i32 {
        match *self {
            // Lengths are bounded by the buffer size (at most 32 MiB).
            Request::Read { len, .. } | Request::Write { len, .. } => {
                i32::try_from(len).unwrap_or(i32::MAX)
            }
            _ => 0,
        }
    }
}

/// Run `req` against `img` synchronously.
fn apply(img: &dyn Image, req: Request, buf: &mut [u8]) -> Result<(), ImageError> {
    fn data(buf: &mut [u8], len: usize) -> Result<&mut [u8], ImageError> {
        buf.get_mut(..len)
            .ok_or_else(|| ImageError::InvalidArgument("request longer than its buffer".into()))
    }
    match req {
        Request::Read { offset, len } => img.read_at(data(buf, len)?, offset),
        Request::Write { offset, len, fua } => {
            img.write_at(data(buf, len)?, offset)?;
            if fua {
                img.flush()?;
            }
            Ok(())
        }
        Request::Flush => img.flush(),
        Request::Discard { offset, len } => img.discard(offset, len),
        Request::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => img.write_zeroes(offset, len, may_unmap),
    }
}

fn answer(req: &Request, r: Result<(), DiskError>) -> i32 {
    match r {
        Ok(()) => req.done_value(),
        Err(e) => -e.errno().abs().max(1),
    }
}

/// Run `req` on `disk`, waiting while it is paused; `buf` is the tag's
/// buffer (at least the request's length for READ/WRITE). Its throttle
/// tokens were taken already ([`Disk::take_tokens`]). Returns bytes done
/// for READ/WRITE, 0 for the rest, or a negative errno.
pub fn execute_taken(disk: &Disk, req: Request, buf: &mut [u8]) -> i32 {
    let (kind, bytes) = req.accounting();
    answer(&req, disk.io_taken(kind, bytes, |img| apply(img, req, buf)))
}

/// As [`execute_taken`], for a request already admitted with `ticket`.
pub fn execute_admitted(ticket: Ticket<'_>, req: Request, buf: &mut [u8]) -> i32 {
    let (kind, bytes) = req.accounting();
    answer(&req, ticket.run(kind, bytes, |img| apply(img, req, buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;
    use std::sync::Arc;

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> UblksrvIoDesc {
        UblksrvIoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn decode_read_write_carry_byte_ranges_and_fua() {
        assert_eq!(
            decode(&desc(UBLK_IO_OP_READ, 0, 8, 8), 65536),
            Ok(Request::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            decode(&desc(UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 1, 1), 65536),
            Ok(Request::Write {
                offset: 512,
                len: 512,
                fua: true
            })
        );
    }

    #[test]
    fn decode_oversized_or_empty_data_request_is_rejected() {
        assert_eq!(
            decode(&desc(UBLK_IO_OP_READ, 0, 0, 129), 65536),
            Err(-libc::EINVAL)
        );
        assert_eq!(
            decode(&desc(UBLK_IO_OP_WRITE, 0, 0, 0), 65536),
            Err(-libc::EINVAL)
        );
    }

    #[test]
    fn decode_sector_overflow_is_rejected() {
        assert_eq!(
            decode(&desc(UBLK_IO_OP_READ, 0, u64::MAX / 256, 1), 65536),
            Err(-libc::EINVAL)
        );
    }

    #[test]
    fn decode_write_zeroes_honours_nounmap_and_unknown_ops_fail() {
        assert_eq!(
            decode(
                &desc(UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP, 2, 4),
                4096
            ),
            Ok(Request::WriteZeroes {
                offset: 1024,
                len: 2048,
                may_unmap: false
            })
        );
        assert_eq!(
            decode(&desc(UBLK_IO_OP_WRITE_SAME, 0, 0, 1), 4096),
            Err(-libc::EOPNOTSUPP)
        );
        assert_eq!(
            decode(&desc(UBLK_IO_OP_FLUSH, 0, 0, 0), 4096),
            Ok(Request::Flush)
        );
    }

    #[test]
    fn decode_flush_ignores_the_none_start_sector() {
        // The block layer gives FLUSH a start sector of -1.
        assert_eq!(
            decode(&desc(UBLK_IO_OP_FLUSH, 0, u64::MAX, 0), 4096),
            Ok(Request::Flush)
        );
    }

    fn disk(len: u64, ro: bool) -> (tempfile::NamedTempFile, Arc<Disk>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let img = RawImage::open(Box::new(f.reopen().unwrap()), "t", ro).unwrap();
        (f, Disk::new(Arc::new(img)))
    }

    #[test]
    fn execute_write_then_read_round_trips_and_counts_bytes() {
        let (_f, d) = disk(1 << 20, false);
        let mut buf = vec![0xabu8; 8192];
        let w = Request::Write {
            offset: 4096,
            len: 8192,
            fua: true,
        };
        assert_eq!(execute_taken(&d, w, &mut buf), 8192);
        let mut out = vec![0u8; 8192];
        let r = Request::Read {
            offset: 4096,
            len: 8192,
        };
        assert_eq!(execute_taken(&d, r, &mut out), 8192);
        assert_eq!(out, buf);
        assert_eq!(d.counters.secs(), [16, 16]);
    }

    #[test]
    fn execute_read_past_the_end_fails_with_negative_errno() {
        let (_f, d) = disk(4096, false);
        let mut buf = vec![0u8; 4096];
        let r = Request::Read {
            offset: 4096,
            len: 4096,
        };
        assert!(execute_taken(&d, r, &mut buf) < 0);
    }

    #[test]
    fn execute_write_on_read_only_image_fails() {
        let (_f, d) = disk(4096, true);
        let mut buf = vec![1u8; 512];
        let w = Request::Write {
            offset: 0,
            len: 512,
            fua: false,
        };
        assert!(execute_taken(&d, w, &mut buf) < 0);
    }

    #[test]
    fn execute_write_zeroes_clears_the_range() {
        let (_f, d) = disk(1 << 16, false);
        let mut buf = vec![9u8; 4096];
        let w = Request::Write {
            offset: 0,
            len: 4096,
            fua: false,
        };
        assert_eq!(execute_taken(&d, w, &mut buf), 4096);
        let z = Request::WriteZeroes {
            offset: 1024,
            len: 1024,
            may_unmap: true,
        };
        assert_eq!(execute_taken(&d, z, &mut buf), 0);
        let mut out = vec![0u8; 4096];
        let r = Request::Read {
            offset: 0,
            len: 4096,
        };
        assert_eq!(execute_taken(&d, r, &mut out), 4096);
        assert!(out[..1024].iter().all(|&b| b == 9));
        assert!(out[1024..2048].iter().all(|&b| b == 0));
        assert!(out[2048..].iter().all(|&b| b == 9));
    }
}
