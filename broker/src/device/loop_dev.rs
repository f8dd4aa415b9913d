//! Loop devices: a regular file (here, the one file of a FUSE mount) made
//! into a block device with `LOOP_CONFIGURE`, and taken down again.
//!
//! The device is configured in one ioctl (block size, read-only, direct
//! I/O, autoclear) so it never exists half set up. We keep an fd of
//! `/dev/loopN` open for the device's life and set `LO_FLAGS_AUTOCLEAR`:
//! if the broker dies, the kernel detaches the loop as soon as the last
//! user closes it, so a crash leaves no device behind.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// How often to retry when another process takes the free device we were
/// offered before we configure it.
const MAX_ATTEMPTS: usize = 32;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// Failures setting up or removing a loop device, named by the step.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("loop: {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("loop: no free loop device after {0} attempts (other processes keep taking them)")]
    NoFreeDevice(usize),
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> LoopError {
    move |source| LoopError::Io { step, source }
}

/// What the loop device should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopSetup {
    pub read_only: bool,
    /// Ask for direct I/O (no page cache of the backing file). The kernel
    /// may refuse it for the file; [`LoopDevice::direct_io`] says what was
    /// granted.
    pub direct_io: bool,
    /// Logical block size in bytes (512 for VHD).
    pub block_size: u32,
    /// Shown by `losetup -l` as the backing file (at most 63 bytes kept).
    pub name: String,
}

/// A configured loop device; [`LoopDevice::detach`] removes it.
#[derive(Debug)]
pub struct LoopDevice {
    file: Option<File>,
    number: u32,
    path: PathBuf,
    direct_io: bool,
}

fn ioctl_ptr<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: callers pass a request whose argument is a pointer to a live,
    // correctly laid out T (checked per call site).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ioctl_none(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the requests used with this wrapper take no argument.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl LoopDevice {
    /// Find a free loop device and configure it over `backing`.
    pub fn attach(backing: BorrowedFd<'_>, setup: &LoopSetup) -> Result<Self, LoopError> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .map_err(io_err("open /dev/loop-control"))?;
        for _ in 0..MAX_ATTEMPTS {
            let n =
                ioctl_none(ctl.as_fd(), LOOP_CTL_GET_FREE).map_err(io_err("LOOP_CTL_GET_FREE"))?;
            let number = u32::try_from(n).map_err(|_| LoopError::Io {
                step: "LOOP_CTL_GET_FREE",
                source: io::Error::from(io::ErrorKind::InvalidData),
            })?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(f) => f,
                // Removed by someone else between GET_FREE and open.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open loop device")(e)),
            };
            match configure(file.as_fd(), backing, setup) {
                Ok(()) => {}
                // Someone configured it first: ask for another.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                // Direct I/O refused for this file (alignment, filesystem):
                // fall back to buffered, which is still correct.
                Err(e) if setup.direct_io && e.raw_os_error() == Some(libc::EINVAL) => {
                    let buffered = LoopSetup {
                        direct_io: false,
                        ..setup.clone()
                    };
                    match configure(file.as_fd(), backing, &buffered) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                        Err(e) => return Err(io_err("LOOP_CONFIGURE")(e)),
                    }
                }
                Err(e) => return Err(io_err("LOOP_CONFIGURE")(e)),
            }
            let mut dev = LoopDevice {
                file: Some(file),
                number,
                path,
                direct_io: false,
            };
            dev.direct_io = dev.flags()? & LO_FLAGS_DIRECT_IO != 0;
            return Ok(dev);
        }
        Err(LoopError::NoFreeDevice(MAX_ATTEMPTS))
    }

    /// Take over a configured loop device from a broker that is gone:
    /// `file` is its open of `/dev/loopN`. Checked against sysfs only (an
    /// ioctl such as LOOP_GET_STATUS64 would ask the backing file's FUSE
    /// server, which may be dead right now).
    pub fn adopt(file: File, number: u32) -> Result<Self, LoopError> {
        let bad = |what: String| LoopError::Io {
            step: "adopting the loop device",
            source: io::Error::other(what),
        };
        let st = file.metadata().map_err(io_err("stat loop device"))?;
        let sys = format!("/sys/block/loop{number}");
        let want = std::fs::read_to_string(format!("{sys}/dev"))
            .map_err(|e| bad(format!("{sys}/dev: {e}")))?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&st);
        let got = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        if !std::os::unix::fs::FileTypeExt::is_block_device(&st.file_type()) || want.trim() != got {
            return Err(bad(format!(
                "the kept fd is {got}, not /dev/loop{number} ({})",
                want.trim()
            )));
        }
        let direct_io =
            std::fs::read_to_string(format!("{sys}/loop/dio")).is_ok_and(|v| v.trim() == "1");
        Ok(LoopDevice {
            file: Some(file),
            number,
            path: PathBuf::from(format!("/dev/loop{number}")),
            direct_io,
        })
    }

    /// The open device, to be kept while no broker runs (autoclear
    /// unbinds it at its last close).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether the kernel granted direct I/O.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// The device's `lo_flags` as the kernel reports them.
    pub fn flags(&self) -> Result<u32, LoopError> {
        let file = self.file.as_ref().ok_or(LoopError::Io {
            step: "LOOP_GET_STATUS64",
            source: io::Error::from_raw_os_error(libc::ENXIO),
        })?;
        let mut info = LoopInfo64::zeroed();
        // LOOP_GET_STATUS64 fills a struct loop_info64.
        ioctl_ptr(file.as_fd(), LOOP_GET_STATUS64, &mut info)
            .map_err(io_err("LOOP_GET_STATUS64"))?;
        Ok(info.lo_flags)
    }

    /// Whether something holds the device exclusively (a mounted
    /// filesystem, device-mapper, md): such a user would see I/O errors if
    /// the device went away under it.
    pub fn in_use(&self) -> bool {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(&self.path)
        {
            Ok(_) => false,
            Err(e) => e.raw_os_error() == Some(libc::EBUSY),
        }
    }

    /// Write back what users left in the device's page cache and make the
    /// backing file durable (loop turns the flush into an fsync of the
    /// file, which FUSE sends to the worker as FSYNC).
    pub fn flush(&self) -> Result<(), LoopError> {
        if let Some(f) = &self.file {
            f.sync_all().map_err(io_err("fsync loop device"))?;
        }
        Ok(())
    }

    /// Unbind the backing file and close the device. If another process
    /// still has the device open, the kernel finishes the detach when it
    /// closes it (autoclear). Idempotent.
    pub fn detach(&mut self) -> Result<(), LoopError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        match ioctl_none(file.as_fd(), LOOP_CLR_FD) {
            Ok(_) => Ok(()),
            // Already unbound (autoclear ran, or someone else cleared it).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(e) => Err(io_err("LOOP_CLR_FD")(e)),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

fn configure(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>, setup: &LoopSetup) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = LO_FLAGS_AUTOCLEAR
        | if setup.read_only {
            LO_FLAGS_READ_ONLY
        } else {
            0
        }
        | if setup.direct_io {
            LO_FLAGS_DIRECT_IO
        } else {
            0
        };
    let name = CString::new(setup.name.replace('\0', "")).unwrap_or_default();
    let name = name.as_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut config = LoopConfig {
        fd,
        block_size: setup.block_size,
        info,
        reserved: [0; 8],
    };
    // LOOP_CONFIGURE reads a struct loop_config.
    ioctl_ptr(dev, LOOP_CONFIGURE, &mut config).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structs_match_the_kernel_layout() {
        // <linux/loop.h>: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
