//! One small io_uring bound to one file and locked down like a seccomp
//! filter: io_uring operations do not pass through seccomp, so each ring is
//! created disabled, gets its single file registered, then
//! `IORING_REGISTER_RESTRICTIONS` allowing only the four opcodes the
//! backing uses (READ, WRITE, FSYNC, FALLOCATE), only on registered files
//! (`IOSQE_FIXED_FILE` required, no other SQE flag allowed), and no further
//! `io_uring_register` operation but `UNREGISTER_FILES`, and only then is
//! it enabled.
//! A compromised worker holding such a ring can do nothing with it that it
//! could not do with the one fd it already has.

use io_uring::{opcode, register::Restriction, squeue, IoUring};
use std::io;
use std::os::fd::RawFd;

/// Entries per ring. A ring serves one request at a time for one caller;
/// the size also caps the kernel's io-wq workers per calling thread (the
/// kernel sizes a thread's io-wq from the first ring it uses).
const RING_ENTRIES: u32 = 2;

/// A restricted ring with one registered file at index 0.
pub struct Ring {
    ring: IoUring,
}

/// `IORING_UNREGISTER_FILES`.
const IORING_UNREGISTER_FILES: u8 = 3;

/// Let go of the file before the ring goes: the kernel tears a closed ring
/// down asynchronously (seconds later when io-wq workers idle out), and
/// until then its registered file stays open, with the image's
/// qemu-compatible lock (broker `image_open::locks`) on it. Unregistering
/// drops it now, so a paused or closed image is free when the worker says so.
impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_files();
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

/// Opcodes a file ring may run.
pub const ALLOWED_OPCODES: [u8; 4] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

impl Ring {
    /// Create a ring for `fd` with its restrictions in place.
    pub fn for_file(fd: RawFd) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(RING_ENTRIES)
            .map_err(|e| annotate(e, "io_uring_setup"))?;
        let sub = ring.submitter();
        sub.register_files(&[fd])
            .map_err(|e| annotate(e, "io_uring_register(FILES)"))?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        let mut res: Vec<Restriction> = ALLOWED_OPCODES
            .iter()
            .map(|&op| Restriction::sqe_op(op))
            .collect();
        res.push(Restriction::sqe_flags_allowed(fixed));
        res.push(Restriction::sqe_flags_required(fixed));
        // The one register operation left: dropping the file (see Drop).
        res.push(Restriction::register_op(IORING_UNREGISTER_FILES));
        sub.register_restrictions(&mut res)
            .map_err(|e| annotate(e, "io_uring_register(RESTRICTIONS)"))?;
        sub.register_enable_rings()
            .map_err(|e| annotate(e, "io_uring_register(ENABLE_RINGS)"))?;
        Ok(Ring { ring })
    }

    /// Submit one entry and wait for its completion; the result is the
    /// CQE's non-negative `res`, or its negated errno as an error.
    ///
    /// # Safety
    /// Any buffer the entry points at must stay valid (and, for reads,
    /// exclusively borrowed) until this returns; since we always wait for
    /// the completion before returning, a borrow over this call suffices.
    pub unsafe fn run(&mut self, entry: squeue::Entry) -> io::Result<u32> {
        // SAFETY: the caller guarantees the buffers outlive the operation,
        // and we do not return before the operation completed.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(annotate(e, "io_uring_enter")),
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res.unsigned_abs())
                };
            }
        }
    }
}

/// Keep the errno (callers match on it) but say which step failed.
fn annotate(e: io::Error, step: &str) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) if step == "io_uring_setup" => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{step}: {e} (is io_uring disabled by the kernel.io_uring_disabled sysctl?)"),
        ),
        _ => io::Error::new(e.kind(), format!("{step}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::types;
    use std::os::fd::AsRawFd;

    #[test]
    fn ring_refuses_unregistered_fds_and_other_opcodes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let other = tempfile::tempfile().unwrap();
        other.set_len(4096).unwrap();
        let mut ring = Ring::for_file(f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 512];
        // Allowed: read on the registered file.
        let ok = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        assert_eq!(unsafe { ring.run(ok) }.unwrap(), 512);
        // Refused: a plain (unregistered) fd, even for an allowed opcode.
        let plain = opcode::Read::new(types::Fd(other.as_raw_fd()), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        let e = unsafe { ring.run(plain) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // Refused: an opcode outside the list (a no-op, even).
        let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
        // SAFETY: nop references no memory.
        let e = unsafe { ring.run(nop) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // Refused: any further registration.
        let e = ring
            .ring
            .submitter()
            .register_files_update(0, &[other.as_raw_fd()])
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
}
