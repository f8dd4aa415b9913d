//! The ublk frontend's kernel side: the broker creates and removes the
//! device on `/dev/ublk-control`; a confined worker serves `/dev/ublkcN`.
//!
//! The device is created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! when the worker dies the kernel keeps `/dev/ublkbN`, holds new I/O and
//! re-queues what the dead worker had taken, and a fresh worker takes over
//! after START_USER_RECOVERY / END_USER_RECOVERY. Nothing fails and nothing
//! hangs for good, which is the whole point of this frontend.
//!
//! Two kernel rules shape the code:
//! - `/dev/ublkcN` may be open only once (the driver refuses a second
//!   open with `EBUSY`), and START_USER_RECOVERY is refused while that open
//!   file lives. So the broker hands its fd to the worker and keeps no copy
//!   (the [`Prepared`] fds move out, and the broker drops them once sent),
//!   and every fd is close-on-exec so no other worker inherits one.
//! - The descriptor array of `/dev/ublkcN` can be mmapped by one process
//!   only (the first to map it, until recovery resets that). The broker
//!   never maps it.

mod ctrl;
mod node;
mod params;
mod recovery;
mod stale;

pub use ctrl::CONTROL_PATH;
pub use params::UblkConfig;
pub use stale::cleanup_stale;

use super::factory::DeviceContext;
use super::{DeviceBackend, DeviceError, Prepared};
use ctrl::{Control, CtrlError};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapjail_common::proto::FrontendKind;
use tapjail_common::ublk_abi::*;
use tapjail_common::worker_proto::FrontendSpec;
use tapjail_common::Minor;

/// The message when the driver is missing, naming the kernel option.
pub const UNAVAILABLE: &str =
    "ublk: /dev/ublk-control missing (CONFIG_BLK_DEV_UBLK; load the ublk_drv module)";

/// How long START_DEV and END_USER_RECOVERY may wait for the worker's
/// queues, and STOP_DEV for requests a live worker holds. Generous:
/// emulated test machines are slow.
const WORKER_WAIT: Duration = Duration::from_secs(60);

/// Whether this host can use the ublk frontend.
pub fn available() -> Result<(), DeviceError> {
    if Path::new(ctrl::CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(DeviceError::Unavailable(UNAVAILABLE.into()))
    }
}

/// One created ublk device.
#[derive(Debug)]
struct Dev {
    /// What ADD_DEV granted.
    info: UblksrvCtrlDevInfo,
    char_major: u32,
    char_minor: u32,
    /// START_DEV succeeded: `/dev/ublkbN` exists.
    started: bool,
    /// The current worker attached all its queues (it reported serving
    /// and START_DEV / END_USER_RECOVERY went through).
    worker_attached: bool,
    /// START_USER_RECOVERY done, END_USER_RECOVERY not yet.
    recovering: bool,
}

/// Marks the devices we create, in the `ublksrv_flags` word the driver
/// stores for the server and never interprets: `"tapj"` in the high half,
/// the minor (or all ones) in the low half. A broker restarting after a
/// crash finds and removes what its predecessor left by it.
const OWNER_MARK: u64 = 0x7461_706a_0000_0000;

fn owner_tag(minor: Option<Minor>) -> u64 {
    OWNER_MARK | minor.map_or(0xffff_ffff, |m| u64::from(m.get()))
}

/// The ublk [`DeviceBackend`].
#[derive(Debug, Default)]
pub struct UblkBackend {
    config: UblkConfig,
    /// The minor this device serves, recorded in the device (see
    /// [`OWNER_MARK`]).
    minor: Option<Minor>,
    ctrl: Option<Control>,
    dev: Option<Dev>,
}

fn ctrl_err(e: CtrlError) -> DeviceError {
    match e {
        CtrlError::Os { cmd, source } => DeviceError::Io {
            step: format!("ublk {cmd}"),
            source,
        },
        CtrlError::Setup { step, source } if source.kind() == std::io::ErrorKind::NotFound => {
            let _ = step;
            DeviceError::Unavailable(UNAVAILABLE.into())
        }
        CtrlError::Setup { step, source } => DeviceError::Io {
            step: format!("ublk: {step}"),
            source,
        },
        e @ CtrlError::Timeout { .. } => DeviceError::Failed(format!("ublk: {e}")),
    }
}

fn io_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeviceError {
    let step = step.into();
    move |source| DeviceError::Io { step, source }
}

impl UblkBackend {
    pub fn new(config: UblkConfig, minor: Option<Minor>) -> Self {
        UblkBackend {
            config,
            minor,
            ctrl: None,
            dev: None,
        }
    }

    /// The backend of one minor, as the factory builds it.
    pub fn for_minor(ctx: &DeviceContext) -> Self {
        UblkBackend::new(UblkConfig::default(), Some(ctx.minor))
    }

    /// The device id (`N` of `/dev/ublkbN`), once prepared.
    pub fn dev_id(&self) -> Option<u32> {
        self.dev.as_ref().map(|d| d.info.dev_id)
    }

    fn ctrl(&mut self) -> Result<&mut Control, DeviceError> {
        if self.ctrl.is_none() {
            self.ctrl = Some(Control::open().map_err(ctrl_err)?);
        }
        Ok(self.ctrl.as_mut().expect("just set"))
    }

    fn spec(dev: &Dev, recovering: bool) -> FrontendSpec {
        FrontendSpec::Ublk {
            dev_id: dev.info.dev_id,
            nr_queues: dev.info.nr_hw_queues,
            queue_depth: dev.info.queue_depth,
            max_io_bytes: dev.info.max_io_buf_bytes,
            recovering,
        }
    }

    /// ADD_DEV .. open `/dev/ublkcN`; undone on failure.
    fn create(&mut self, size: u64, read_only: bool) -> Result<(Dev, OwnedFd), DeviceError> {
        let cfg = self.config;
        let want = UblksrvCtrlDevInfo {
            nr_hw_queues: cfg.nr_queues,
            queue_depth: cfg.queue_depth,
            max_io_buf_bytes: cfg.max_io_bytes,
            dev_id: UBLK_DEV_ID_ANY,
            flags: UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_CMD_IOCTL_ENCODE,
            ublksrv_flags: owner_tag(self.minor),
            ..Default::default()
        };
        let ctrl = self.ctrl()?;
        let info = ctrl.add_dev(want).map_err(ctrl_err)?;
        let dev_id = info.dev_id;
        let undo = |ctrl: &mut Control| {
            let _ = ctrl.stop_dev(dev_id, ctrl::QUICK);
            let _ = ctrl.del_dev(dev_id, ctrl::QUICK);
        };
        let needed = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
        if info.flags & needed != needed {
            undo(ctrl);
            return Err(DeviceError::Unavailable(format!(
                "ublk: the driver does not offer user recovery with re-issue (flags {:#x}); \
                 a dead worker would fail I/O, so ublk is not used",
                info.flags
            )));
        }
        if info.nr_hw_queues == 0
            || info.queue_depth == 0
            || info.max_io_buf_bytes < 4096
            || info.max_io_buf_bytes > UBLK_MAX_IO_BUF_BYTES
        {
            undo(ctrl);
            return Err(DeviceError::Failed(format!(
                "ublk: driver granted an unusable geometry {info:?}"
            )));
        }
        let setup = (|| {
            ctrl.set_params(dev_id, Self::params(&info, size, read_only))
                .map_err(ctrl_err)?;
            let p = ctrl.get_params(dev_id).map_err(ctrl_err)?;
            if p.types & UBLK_PARAM_TYPE_DEVT == 0 {
                return Err(DeviceError::Failed(
                    "ublk GET_PARAMS: no device numbers in the answer".into(),
                ));
            }
            let file = node::open_char(dev_id, p.devt.char_major, p.devt.char_minor).map_err(
                io_err(format!("open {}", node::char_path(dev_id).display())),
            )?;
            Ok((p.devt.char_major, p.devt.char_minor, OwnedFd::from(file)))
        })();
        match setup {
            Ok((char_major, char_minor, fd)) => Ok((
                Dev {
                    info,
                    char_major,
                    char_minor,
                    started: false,
                    worker_attached: false,
                    recovering: false,
                },
                fd,
            )),
            Err(e) => {
                undo(ctrl);
                Err(e)
            }
        }
    }
}

impl DeviceBackend for UblkBackend {
    fn kind(&self) -> FrontendKind {
        FrontendKind::Ublk
    }

    fn prepare(&mut self, size: u64, read_only: bool) -> Result<Prepared, DeviceError> {
        if self.dev.is_some() {
            return Err(DeviceError::Failed(
                "ublk: device already prepared; tear it down first".into(),
            ));
        }
        self.config.validate()?;
        // The tail of a size that is not a whole number of sectors cannot be
        // addressed through a block device.
        if size >> 9 == 0 {
            return Err(DeviceError::Failed(format!(
                "ublk: a {size}-byte disk has no whole sector"
            )));
        }
        available()?;
        let (dev, fd) = self.create(size, read_only)?;
        let spec = Self::spec(&dev, false);
        self.dev = Some(dev);
        Ok(Prepared {
            spec,
            fds: vec![fd],
        })
    }

    fn activate(&mut self, worker_pid: u32) -> Result<PathBuf, DeviceError> {
        let (dev_id, started) = match &self.dev {
            Some(d) => (d.info.dev_id, d.started),
            None => return Err(DeviceError::Failed("ublk: activate before prepare".into())),
        };
        if started {
            return Err(DeviceError::Failed(format!(
                "ublk: device {dev_id} already started"
            )));
        }
        let ctrl = self.ctrl()?;
        ctrl.start_dev(dev_id, worker_pid, WORKER_WAIT)
            .map_err(ctrl_err)?;
        let p = ctrl.get_params(dev_id).map_err(ctrl_err)?;
        let path = node::block_path(dev_id);
        node::wait_node(&path, true, p.devt.disk_major, p.devt.disk_minor)
            .map_err(io_err(format!("wait for {}", path.display())))?;
        if let Some(d) = self.dev.as_mut() {
            d.started = true;
            d.worker_attached = true;
        }
        Ok(path)
    }

    fn recover(&mut self) -> Result<Prepared, DeviceError> {
        let (dev_id, started, attached, recovering, nr_queues) = match &self.dev {
            Some(d) => (
                d.info.dev_id,
                d.started,
                d.worker_attached,
                d.recovering,
                d.info.nr_hw_queues,
            ),
            None => return Err(DeviceError::Failed("ublk: recover without a device".into())),
        };
        if !started {
            return Err(DeviceError::Failed(format!(
                "ublk: the worker died before device {dev_id} was started; tear it down and \
                 prepare it again"
            )));
        }
        if recovering && !attached && nr_queues > 1 {
            // See UblkConfig::nr_queues: some queues may be attached and
            // some not, which 6.12's START_USER_RECOVERY mishandles.
            return Err(DeviceError::Failed(format!(
                "ublk: the replacement worker of device {dev_id} died while attaching its \
                 {nr_queues} queues; the device cannot be recovered safely"
            )));
        }
        if let Some(d) = self.dev.as_mut() {
            d.worker_attached = false;
        }
        self.start_recovery(dev_id)?;
        let (major, minor) = {
            let d = self.dev.as_mut().expect("checked above");
            d.recovering = true;
            (d.char_major, d.char_minor)
        };
        let file = node::open_char(dev_id, major, minor).map_err(io_err(format!(
            "reopen {}",
            node::char_path(dev_id).display()
        )))?;
        let spec = Self::spec(self.dev.as_ref().expect("checked above"), true);
        Ok(Prepared {
            spec,
            fds: vec![OwnedFd::from(file)],
        })
    }

    fn recovered(&mut self, worker_pid: u32) -> Result<(), DeviceError> {
        let dev_id = match &self.dev {
            Some(d) if d.recovering => d.info.dev_id,
            Some(d) => {
                return Err(DeviceError::Failed(format!(
                    "ublk: device {} is not being recovered",
                    d.info.dev_id
                )))
            }
            None => {
                return Err(DeviceError::Failed(
                    "ublk: recovered without a device".into(),
                ))
            }
        };
        self.ctrl()?
            .end_user_recovery(dev_id, worker_pid, WORKER_WAIT)
            .map_err(ctrl_err)?;
        if let Some(d) = self.dev.as_mut() {
            d.recovering = false;
            d.worker_attached = true;
        }
        Ok(())
    }

    fn handoff(&self) -> Option<super::HandoffFds<'_>> {
        let d = self.dev.as_ref().filter(|d| d.started)?;
        Some((
            super::Handoff {
                kind: "ublk".into(),
                node: node::block_path(d.info.dev_id),
                ublk_dev_id: Some(d.info.dev_id),
                ..Default::default()
            },
            Vec::new(),
        ))
    }

    /// STOP_DEV now, DEL_DEV at teardown. With `UBLK_F_USER_RECOVERY` a
    /// device whose server died holds its I/O until a new server ends the
    /// recovery; stopping it removes the gendisk, which fails that I/O.
    fn abandon(&mut self) -> Result<(), DeviceError> {
        let Some(dev_id) = self
            .dev
            .as_ref()
            .filter(|d| d.started)
            .map(|d| d.info.dev_id)
        else {
            return Ok(());
        };
        match self.ctrl()?.stop_dev(dev_id, WORKER_WAIT) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::ENODEV) => {}
            Err(e) => return Err(ctrl_err(e)),
        }
        if let Some(d) = self.dev.as_mut() {
            d.started = false;
            d.worker_attached = false;
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), DeviceError> {
        let Some(dev_id) = self.dev_id() else {
            self.ctrl = None;
            return Ok(());
        };
        let ctrl = match self.ctrl() {
            Ok(c) => c,
            // The driver is gone, and with it every device.
            Err(DeviceError::Unavailable(_)) => {
                self.dev = None;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let gone = |e: &CtrlError| e.errno() == Some(libc::ENODEV);
        match ctrl.stop_dev(dev_id, WORKER_WAIT) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e @ CtrlError::Timeout { .. }) => {
                return Err(DeviceError::Failed(format!(
                    "ublk: {e}: the worker is not completing requests; kill it and tear down again"
                )))
            }
            Err(e) => return Err(ctrl_err(e)),
        }
        match ctrl.del_dev(dev_id, ctrl::QUICK) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(ctrl_err(e)),
        }
        self.dev = None;
        // Closing the ring also cancels any command we gave up waiting for.
        self.ctrl = None;
        Ok(())
    }
}
