//! ublk control commands: io_uring `URING_CMD`s on `/dev/ublk-control`.
//!
//! The control device takes no ioctl(2); every command is a 128-byte
//! submission queue entry whose 80-byte command area holds a
//! [`UblksrvCtrlCmd`], optionally pointing at an in/out buffer. The driver
//! runs commands that may sleep (START_DEV waits for the server's FETCHes,
//! STOP_DEV for in-flight requests) on io_uring's worker threads, so a
//! command can take long; every wait here has a deadline, and a command
//! that overstays it is abandoned (its buffer is leaked, never freed under
//! the kernel) and later completions are matched by `user_data`.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};
use tapjail_common::ublk_abi::*;

/// Where the ublk driver's control node lives.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// What a control command can end in.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// The driver answered with this errno.
    #[error("{cmd}: {source}")]
    Os {
        cmd: &'static str,
        #[source]
        source: io::Error,
    },
    /// The command did not complete in time; it stays in flight.
    #[error("{cmd}: no answer from the ublk driver after {secs} s")]
    Timeout { cmd: &'static str, secs: u64 },
    /// Opening `/dev/ublk-control` or setting up the ring failed.
    #[error("{step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

impl CtrlError {
    /// The driver's errno, if it gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CtrlError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// An open `/dev/ublk-control` with a private ring for its commands.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    next_user_data: u64,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("fd", &self.file.as_raw_fd())
            .field("ring_fd", &self.ring.as_raw_fd())
            .finish()
    }
}

/// How long a command that should not sleep may take.
pub const QUICK: Duration = Duration::from_secs(10);

impl Control {
    /// Open the control node. `NotFound` means the driver is not loaded.
    pub fn open() -> Result<Self, CtrlError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // Never leak a ublk fd into a worker spawned for another disk.
            .custom_flags(libc::O_CLOEXEC)
            .open(CONTROL_PATH)
            .map_err(|source| CtrlError::Setup {
                step: "open /dev/ublk-control",
                source,
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(8)
            .map_err(|source| CtrlError::Setup {
                step: "io_uring_setup (128-byte SQEs) for ublk control",
                source,
            })?;
        Ok(Control {
            file,
            ring,
            next_user_data: 1,
        })
    }

    /// Submit one command and wait for its completion, at most `timeout`.
    ///
    /// # Safety
    /// `cmd.addr`, when non-zero, must point to `cmd.len` bytes that stay
    /// valid (and, for commands that write, writable and not otherwise
    /// borrowed) until the command completes — which after a timeout may be
    /// never, so such buffers must then be leaked by the caller.
    unsafe fn raw(
        &mut self,
        name: &'static str,
        op: u32,
        cmd: &UblksrvCtrlCmd,
        timeout: Duration,
    ) -> Result<i32, CtrlError> {
        let user_data = self.next_user_data;
        self.next_user_data += 1;
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd.to_sqe_cmd80())
            .build()
            .user_data(user_data);
        // SAFETY: the command area is copied into the SQE; what `addr`
        // points to is the caller's promise (see above).
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // The queue holds only abandoned commands' entries if anything;
            // flush them and retry once.
            self.ring
                .submit()
                .map_err(|source| CtrlError::Os { cmd: name, source })?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }.map_err(|_| CtrlError::Os {
                cmd: name,
                source: io::Error::from_raw_os_error(libc::EBUSY),
            })?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(cqe) = self.ring.completion().next() {
                if cqe.user_data() == user_data {
                    let res = cqe.result();
                    return if res < 0 {
                        Err(CtrlError::Os {
                            cmd: name,
                            source: io::Error::from_raw_os_error(-res),
                        })
                    } else {
                        Ok(res)
                    };
                }
                // A completion of an earlier, abandoned command: drop it.
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CtrlError::Timeout {
                    cmd: name,
                    secs: timeout.as_secs(),
                });
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(source) => return Err(CtrlError::Os { cmd: name, source }),
            }
        }
    }

    /// A command without a buffer.
    fn simple(
        &mut self,
        name: &'static str,
        op: u32,
        dev_id: u32,
        data: u64,
        timeout: Duration,
    ) -> Result<i32, CtrlError> {
        let cmd = UblksrvCtrlCmd {
            dev_id,
            queue_id: UBLK_QUEUE_ID_NONE,
            data: [data],
            ..Default::default()
        };
        // SAFETY: addr is 0: the command touches no user memory.
        unsafe { self.raw(name, op, &cmd, timeout) }
    }

    /// A command with an in/out buffer of type `T`. The buffer lives on the
    /// heap and is leaked if the command times out.
    fn with_buf<T: Copy>(
        &mut self,
        name: &'static str,
        op: u32,
        dev_id: u32,
        value: T,
        timeout: Duration,
    ) -> Result<T, CtrlError> {
        let mut buf = Box::new(value);
        let len = u16::try_from(std::mem::size_of::<T>()).map_err(|_| CtrlError::Os {
            cmd: name,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let cmd = UblksrvCtrlCmd {
            dev_id,
            queue_id: UBLK_QUEUE_ID_NONE,
            len,
            addr: std::ptr::addr_of_mut!(*buf) as u64,
            ..Default::default()
        };
        // SAFETY: `buf` is a live heap allocation of `len` bytes, not
        // borrowed elsewhere; on timeout it is leaked below, so the kernel
        // can never write to freed memory.
        match unsafe { self.raw(name, op, &cmd, timeout) } {
            Ok(_) => {
                // SAFETY: the kernel finished writing before the completion
                // was posted; read through the raw pointer so the compiler
                // does not reuse a value from before the command.
                Ok(unsafe { std::ptr::read_volatile(std::ptr::addr_of!(*buf)) })
            }
            Err(e @ CtrlError::Timeout { .. }) => {
                Box::leak(buf);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// ADD_DEV: create `/dev/ublkcN`. Returns what the driver granted
    /// (device id, queue count clamped to the CPUs, flags it supports).
    pub fn add_dev(&mut self, info: UblksrvCtrlDevInfo) -> Result<UblksrvCtrlDevInfo, CtrlError> {
        self.with_buf(
            "UBLK_CMD_ADD_DEV",
            UBLK_U_CMD_ADD_DEV,
            info.dev_id,
            info,
            QUICK,
        )
    }

    pub fn set_params(&mut self, dev_id: u32, params: UblkParams) -> Result<(), CtrlError> {
        self.with_buf(
            "UBLK_CMD_SET_PARAMS",
            UBLK_U_CMD_SET_PARAMS,
            dev_id,
            params,
            QUICK,
        )
        .map(|_| ())
    }

    pub fn get_params(&mut self, dev_id: u32) -> Result<UblkParams, CtrlError> {
        let p = UblkParams {
            len: std::mem::size_of::<UblkParams>() as u32,
            ..Default::default()
        };
        self.with_buf(
            "UBLK_CMD_GET_PARAMS",
            UBLK_U_CMD_GET_PARAMS,
            dev_id,
            p,
            QUICK,
        )
    }

    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<UblksrvCtrlDevInfo, CtrlError> {
        self.with_buf(
            "UBLK_CMD_GET_DEV_INFO",
            UBLK_U_CMD_GET_DEV_INFO,
            dev_id,
            UblksrvCtrlDevInfo::default(),
            QUICK,
        )
    }

    /// START_DEV: create `/dev/ublkbN`. Waits until every queue has fetched
    /// all its tags, so call it once the worker says it is serving.
    pub fn start_dev(&mut self, dev_id: u32, pid: u32, timeout: Duration) -> Result<(), CtrlError> {
        self.simple(
            "UBLK_CMD_START_DEV",
            UBLK_U_CMD_START_DEV,
            dev_id,
            u64::from(pid),
            timeout,
        )
        .map(|_| ())
    }

    /// STOP_DEV: remove `/dev/ublkbN`, failing queued I/O, and abort the
    /// server's fetches. Waits for requests a live server holds.
    pub fn stop_dev(&mut self, dev_id: u32, timeout: Duration) -> Result<(), CtrlError> {
        self.simple("UBLK_CMD_STOP_DEV", UBLK_U_CMD_STOP_DEV, dev_id, 0, timeout)
            .map(|_| ())
    }

    /// DEL_DEV_ASYNC (6.9+), else DEL_DEV: remove `/dev/ublkcN`. The async
    /// form does not wait for the char device's last fd to close (a stuck
    /// worker must not stall the broker); the number is freed when it does.
    pub fn del_dev(&mut self, dev_id: u32, timeout: Duration) -> Result<(), CtrlError> {
        match self.simple(
            "UBLK_CMD_DEL_DEV_ASYNC",
            UBLK_U_CMD_DEL_DEV_ASYNC,
            dev_id,
            0,
            timeout,
        ) {
            Err(e) if matches!(e.errno(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) => self
                .simple("UBLK_CMD_DEL_DEV", UBLK_U_CMD_DEL_DEV, dev_id, 0, timeout)
                .map(|_| ()),
            other => other.map(|_| ()),
        }
    }

    /// START_USER_RECOVERY: `EBUSY` while the device is not yet QUIESCED or
    /// any fd of `/dev/ublkcN` is still open.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<(), CtrlError> {
        self.simple(
            "UBLK_CMD_START_USER_RECOVERY",
            UBLK_U_CMD_START_USER_RECOVERY,
            dev_id,
            0,
            QUICK,
        )
        .map(|_| ())
    }

    /// END_USER_RECOVERY: waits until the new server fetched every tag,
    /// then lets the queued and re-issued requests through.
    pub fn end_user_recovery(
        &mut self,
        dev_id: u32,
        pid: u32,
        timeout: Duration,
    ) -> Result<(), CtrlError> {
        self.simple(
            "UBLK_CMD_END_USER_RECOVERY",
            UBLK_U_CMD_END_USER_RECOVERY,
            dev_id,
            u64::from(pid),
            timeout,
        )
        .map(|_| ())
    }
}
