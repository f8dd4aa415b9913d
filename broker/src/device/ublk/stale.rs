//! Removing the devices a previous broker created for a minor.

use super::ctrl::{self, Control, CtrlError};
use super::{available, ctrl_err, owner_tag};
use crate::device::factory::DeviceContext;
use crate::device::DeviceError;

/// Remove every ublk device a previous broker created for `ctx.minor`
/// (found by the owner mark in `ublksrv_flags`): STOP_DEV fails what I/O it still holds,
/// DEL_DEV removes it. Returns what was done.
pub fn cleanup_stale(ctx: &DeviceContext) -> Result<Vec<String>, DeviceError> {
    if available().is_err() {
        return Ok(Vec::new());
    }
    let ids: Vec<u32> = match std::fs::read_dir("/sys/class/ublk-char") {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("ublkc"))
                    .and_then(|n| n.parse().ok())
            })
            .collect(),
        Err(_) => return Ok(Vec::new()),
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut ctrl = Control::open().map_err(ctrl_err)?;
    let want = owner_tag(Some(ctx.minor));
    let mut done = Vec::new();
    for id in ids {
        // Devices of other users may refuse us or vanish meanwhile.
        let Ok(info) = ctrl.get_dev_info(id) else {
            continue;
        };
        if info.ublksrv_flags != want {
            continue;
        }
        let gone = |e: &CtrlError| e.errno() == Some(libc::ENODEV);
        match ctrl.stop_dev(id, ctrl::QUICK) {
            Ok(()) => {}
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(ctrl_err(e)),
        }
        match ctrl.del_dev(id, ctrl::QUICK) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(ctrl_err(e)),
        }
        done.push(format!(
            "removed stale ublk device {id} of minor {}",
            ctx.minor.get()
        ));
    }
    Ok(done)
}
