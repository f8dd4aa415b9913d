//! Taking a device over: from a broker that is gone (adopt), and from a
//! worker that died (START_USER_RECOVERY once the kernel has quiesced it).

use super::{ctrl_err, owner_tag, Dev, UblkBackend};
use crate::device::factory::DeviceContext;
use crate::device::{DeviceError, Handoff};
use std::time::{Duration, Instant};
use tapjail_common::ublk_abi::*;

/// How long recovery waits for the kernel to notice the dead worker
/// (device QUIESCED and its `/dev/ublkcN` file released).
const QUIESCE_WAIT: Duration = Duration::from_secs(60);

impl UblkBackend {
    /// Take over device `h.ublk_dev_id` from a broker that is gone. The
    /// broker holds no fd of a ublk device (the worker holds
    /// `/dev/ublkcN`), so there is nothing to get back: the device must
    /// still carry this minor's owner mark and be live or waiting for
    /// recovery (its worker died).
    pub fn adopt(ctx: &DeviceContext, h: &Handoff) -> Result<Self, DeviceError> {
        let dev_id = h
            .ublk_dev_id
            .ok_or_else(|| DeviceError::Failed("ublk: adopting: no device id recorded".into()))?;
        let mut b = UblkBackend::for_minor(ctx);
        let want = owner_tag(b.minor);
        let ctrl = b.ctrl()?;
        let info = ctrl.get_dev_info(dev_id).map_err(ctrl_err)?;
        if info.ublksrv_flags != want {
            return Err(DeviceError::Failed(format!(
                "ublk: device {dev_id} is not minor {}'s (owner mark {:#x})",
                ctx.minor, info.ublksrv_flags
            )));
        }
        if !matches!(info.state, UBLK_S_DEV_LIVE | UBLK_S_DEV_QUIESCED) {
            return Err(DeviceError::Failed(format!(
                "ublk: device {dev_id} is in state {}, not live",
                info.state
            )));
        }
        let p = ctrl.get_params(dev_id).map_err(ctrl_err)?;
        b.dev = Some(Dev {
            info,
            char_major: p.devt.char_major,
            char_minor: p.devt.char_minor,
            started: true,
            worker_attached: true,
            recovering: false,
        });
        Ok(b)
    }

    /// Wait until the kernel has quiesced the device after its worker died
    /// and released the dead worker's `/dev/ublkcN`, then start recovery.
    pub(super) fn start_recovery(&mut self, dev_id: u32) -> Result<(), DeviceError> {
        let ctrl = self.ctrl()?;
        let deadline = Instant::now() + QUIESCE_WAIT;
        let mut last_state;
        loop {
            let info = ctrl.get_dev_info(dev_id).map_err(ctrl_err)?;
            last_state = info.state;
            match info.state {
                UBLK_S_DEV_QUIESCED => match ctrl.start_user_recovery(dev_id) {
                    Ok(()) => return Ok(()),
                    // The dead worker's file is not released yet.
                    Err(e) if e.errno() == Some(libc::EBUSY) => {}
                    Err(e) => return Err(ctrl_err(e)),
                },
                UBLK_S_DEV_LIVE => {}
                state => {
                    return Err(DeviceError::Failed(format!(
                        "ublk: device {dev_id} is in state {state}, not recoverable"
                    )))
                }
            }
            if Instant::now() >= deadline {
                return Err(DeviceError::Failed(format!(
                    "ublk: device {dev_id} not ready for recovery after {} s (state {last_state}; \
                     is the old worker really gone and every fd of /dev/ublkc{dev_id} closed?)",
                    QUIESCE_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
