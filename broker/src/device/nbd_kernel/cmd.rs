//! The kernel nbd driver's netlink commands (`include/uapi/linux/nbd-netlink.h`):
//! CONNECT a device to sockets, RECONFIGURE it onto fresh ones,
//! DISCONNECT it, and ask its STATUS.

use super::genl::{attr_u32, attrs, Genl, GenlError};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const CMD_STATUS: u8 = 5;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_DEVICE_LIST: u16 = 9;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
const DEVICE_ITEM: u16 = 1;
const DEVICE_INDEX: u16 = 1;
const DEVICE_CONNECTED: u16 = 2;

/// NBD transmission flags the kernel is told the server has.
pub mod flags {
    pub const HAS_FLAGS: u64 = 1 << 0;
    pub const READ_ONLY: u64 = 1 << 1;
    pub const SEND_FLUSH: u64 = 1 << 2;
    pub const SEND_FUA: u64 = 1 << 3;
    pub const SEND_TRIM: u64 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u64 = 1 << 6;
    pub const CAN_MULTI_CONN: u64 = 1 << 8;
}

/// The flags of our worker's NBD server (see the worker's
/// `handshake::ExportInfo::tflags`, without the structured-reply ones the
/// kernel never negotiates).
pub fn server_flags(read_only: bool) -> u64 {
    use flags::*;
    let f = HAS_FLAGS | SEND_FLUSH | SEND_FUA | CAN_MULTI_CONN;
    if read_only {
        f | READ_ONLY
    } else {
        f | SEND_TRIM | SEND_WRITE_ZEROES
    }
}

/// How a device is connected.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    /// `None`: let the kernel pick a free device (or make one).
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    pub read_only: bool,
    /// Per request: one that takes longer is re-queued (needed so that
    /// requests a dead worker had taken are sent again after a
    /// reconfigure; without it they would wait forever).
    pub timeout: Duration,
    /// How long I/O waits for a reconfigure once every connection died.
    pub dead_conn_timeout: Duration,
    /// Shown in `/sys/block/nbdN/backend`; marks the device as ours.
    pub backend: &'a str,
    pub socks: &'a [BorrowedFd<'a>],
}

/// An open handle on the driver.
#[derive(Debug)]
pub struct Driver {
    genl: Genl,
}

fn sockets(m: &mut super::genl::Msg, socks: &[BorrowedFd<'_>]) {
    m.nest(ATTR_SOCKETS);
    for s in socks {
        m.nest(SOCK_ITEM);
        // The kernel looks the number up in our own fd table while it
        // handles the request (it takes its own reference).
        m.put_u32(SOCK_FD, s.as_raw_fd() as u32);
        m.end_nest();
    }
    m.end_nest();
}

impl Driver {
    /// [`GenlError::NotLoaded`] when the nbd module is not loaded.
    pub fn open() -> Result<Driver, GenlError> {
        Ok(Driver {
            genl: Genl::open(FAMILY, VERSION)?,
        })
    }

    /// NBD_CMD_CONNECT; returns the device index the kernel used.
    pub fn connect(&mut self, c: &Connect<'_>) -> Result<u32, GenlError> {
        let mut m = self.genl.msg(CMD_CONNECT);
        if let Some(i) = c.index {
            m.put_u32(ATTR_INDEX, i);
        }
        m.put_u64(ATTR_SIZE_BYTES, c.size)
            .put_u64(ATTR_BLOCK_SIZE_BYTES, c.block_size)
            .put_u64(ATTR_TIMEOUT, c.timeout.as_secs().max(1))
            .put_u64(ATTR_SERVER_FLAGS, server_flags(c.read_only))
            .put_u64(ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout.as_secs().max(1))
            .put_str(ATTR_BACKEND_IDENTIFIER, c.backend);
        sockets(&mut m, c.socks);
        let what = match c.index {
            Some(i) => format!("NBD_CMD_CONNECT nbd{i}"),
            None => "NBD_CMD_CONNECT".to_string(),
        };
        let answer = self.genl.call(&what, m)?;
        let list = attrs(&answer).map_err(|why| GenlError::Malformed {
            what: what.clone(),
            why,
        })?;
        attr_u32(&list, ATTR_INDEX)
            .or(c.index)
            .ok_or(GenlError::Malformed {
                what,
                why: "no device index in the answer",
            })
    }

    /// NBD_CMD_RECONFIGURE: put `socks` in place of dead connections.
    /// `backend` must be the identifier the device was connected with
    /// (the kernel refuses a reconfigure without it, EINVAL).
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        dead_conn_timeout: Duration,
        socks: &[BorrowedFd<'_>],
    ) -> Result<(), GenlError> {
        let mut m = self.genl.msg(CMD_RECONFIGURE);
        m.put_u32(ATTR_INDEX, index)
            .put_str(ATTR_BACKEND_IDENTIFIER, backend)
            .put_u64(ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout.as_secs().max(1));
        sockets(&mut m, socks);
        self.genl
            .call(&format!("NBD_CMD_RECONFIGURE nbd{index}"), m)
            .map(|_| ())
    }

    /// NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC to the server,
    /// shuts the sockets down and fails what is queued.
    pub fn disconnect(&mut self, index: u32) -> Result<(), GenlError> {
        let mut m = self.genl.msg(CMD_DISCONNECT);
        m.put_u32(ATTR_INDEX, index);
        self.genl
            .call(&format!("NBD_CMD_DISCONNECT nbd{index}"), m)
            .map(|_| ())
    }

    /// NBD_CMD_STATUS of one device: whether it is connected (the kernel
    /// still holds a configuration for it). `None`: no such device.
    pub fn connected(&mut self, index: u32) -> Result<Option<bool>, GenlError> {
        let mut m = self.genl.msg(CMD_STATUS);
        m.put_u32(ATTR_INDEX, index);
        let what = format!("NBD_CMD_STATUS nbd{index}");
        let answer = self.genl.call(&what, m)?;
        parse_status(&answer, index).map_err(|why| GenlError::Malformed { what, why })
    }
}

/// Find `index` in a STATUS answer's device list.
pub fn parse_status(answer: &[u8], index: u32) -> Result<Option<bool>, &'static str> {
    for (ty, list) in attrs(answer)? {
        if ty != ATTR_DEVICE_LIST {
            continue;
        }
        for (ty, item) in attrs(list)? {
            if ty != DEVICE_ITEM {
                continue;
            }
            let fields = attrs(item)?;
            if attr_u32(&fields, DEVICE_INDEX) == Some(index) {
                let connected = fields
                    .iter()
                    .find(|(t, _)| *t == DEVICE_CONNECTED)
                    .and_then(|(_, p)| p.first())
                    .ok_or("device item without a connected field")?;
                return Ok(Some(*connected != 0));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::genl::Msg;
    use super::*;

    #[test]
    fn server_flags_follow_read_only() {
        let rw = server_flags(false);
        assert_ne!(rw & flags::SEND_TRIM, 0);
        assert_ne!(rw & flags::SEND_FLUSH, 0);
        assert_eq!(rw & flags::READ_ONLY, 0);
        let ro = server_flags(true);
        assert_ne!(ro & flags::READ_ONLY, 0);
        assert_eq!(ro & (flags::SEND_TRIM | flags::SEND_WRITE_ZEROES), 0);
    }

    #[test]
    fn status_answer_is_found_by_index() {
        // Build the answer's attributes the way the kernel does.
        let mut m = Msg::new(0x1c, CMD_STATUS, 1, 1);
        m.nest(ATTR_DEVICE_LIST);
        for (i, c) in [(0u32, 1u8), (3, 0)] {
            m.nest(DEVICE_ITEM)
                .put_u32(DEVICE_INDEX, i)
                .put(DEVICE_CONNECTED, &[c])
                .end_nest();
        }
        m.end_nest();
        let b = m.finish();
        let answer = &b[20..];
        assert_eq!(parse_status(answer, 0), Ok(Some(true)));
        assert_eq!(parse_status(answer, 3), Ok(Some(false)));
        assert_eq!(parse_status(answer, 5), Ok(None));
    }
}
