//! Waiting for the kernel to let go of a device, and disconnecting what a
//! broker that is gone left connected under this minor's identifier.

use super::cmd::Driver;
use super::{genl_err, identifier, sysfs};
use crate::device::factory::DeviceContext;
use crate::device::DeviceError;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `teardown` waits for the kernel to let go after DISCONNECT.
const FREE_WAIT: Duration = Duration::from_secs(30);

/// Disconnect what a broker that is gone left connected for `ctx.minor`.
pub fn cleanup_stale(ctx: &DeviceContext) -> Result<Vec<String>, DeviceError> {
    let ident = identifier(&ctx.state_dir, ctx.minor);
    let stale = sysfs::owned_by(Path::new(sysfs::SYS_BLOCK), &ident);
    if stale.is_empty() {
        return Ok(Vec::new());
    }
    let mut driver = Driver::open().map_err(genl_err)?;
    let mut done = Vec::new();
    for index in stale {
        driver.disconnect(index).map_err(genl_err)?;
        wait_free(&mut driver, index)?;
        done.push(format!("disconnected stale /dev/nbd{index}"));
    }
    Ok(done)
}

/// Wait until the kernel no longer holds a configuration for `index`.
pub(super) fn wait_free(driver: &mut Driver, index: u32) -> Result<(), DeviceError> {
    let deadline = Instant::now() + FREE_WAIT;
    loop {
        let busy = match driver.connected(index) {
            Ok(c) => c.unwrap_or(false),
            Err(e) => return Err(genl_err(e)),
        } || sysfs::connected(Path::new(sysfs::SYS_BLOCK), index);
        if !busy {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DeviceError::Failed(format!(
                "nbd-kernel: /dev/nbd{index} is disconnected but still held open after {} s \
                 (a mount or a process using it); it frees itself once they close it",
                FREE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
