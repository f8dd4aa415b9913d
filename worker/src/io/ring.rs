//! Restricted io_uring rings, made once, before seccomp.
//!
//! io_uring operations do not pass through seccomp, and a ring made after
//! confinement could run any opcode on any path (the io_uring escape of
//! issue 11). So every ring a worker uses is made by [`restricted`] while
//! the process is still being confined: set up disabled, given a sparse
//! file table, then `IORING_REGISTER_RESTRICTIONS` allowing only the
//! opcodes its user needs, only on registered files (`IOSQE_FIXED_FILE`
//! required, no other SQE flag), and only the `FILES_UPDATE` registration
//! (to put fds the worker already holds into its slots). After that,
//! seccomp refuses `io_uring_setup`, so no other ring can exist.
//!
//! A compromised worker holding such a ring can do nothing with it that it
//! could not do with the fds it already has. This one function is used by
//! the image-file rings ([`Ring`], pooled by `super::pool`) and the ublk
//! queue rings (`frontend::ublk::rings`).

use io_uring::{cqueue, opcode, register::Restriction, squeue, IoUring};
use std::io;

/// `io_uring_register` op that fills or clears file-table slots; the only
/// one a restricted ring allows once enabled.
pub const IORING_REGISTER_FILES_UPDATE: u8 = 6;

/// The ring type every worker ring has.
pub type Uring = IoUring<squeue::Entry, cqueue::Entry>;

/// What a restricted ring is for.
#[derive(Debug, Clone, Copy)]
pub struct RingSpec<'a> {
    /// What failed, in messages ("an image-file ring", "a ublk queue ring").
    pub what: &'static str,
    pub sq_entries: u32,
    /// CQ size; `None` lets the kernel pick (twice the SQ).
    pub cq_entries: Option<u32>,
    /// SINGLE_ISSUER + DEFER_TASKRUN: the thread that enables the ring is
    /// its only submitter (see `frontend::ublk::queue`).
    pub single_issuer: bool,
    /// Slots of the sparse file table, filled later with FILES_UPDATE.
    pub file_slots: u32,
    /// Opcodes the ring may run.
    pub opcodes: &'a [u8],
    /// io-wq workers a thread that submits here may have.
    pub iowq: IowqMax,
}

/// `IORING_REGISTER_IOWQ_MAX_WORKERS` for a ring: how many io-wq workers
/// (kernel threads that run the requests that must block) each thread
/// submitting to it may have. io-wq is per thread and its workers count
/// toward the worker cgroup's `pids.max`; a worker the kernel cannot
/// create there fails its request (ECANCELED, an EIO to the guest). The
/// kernel's own caps (bounded: the SQ size up to 4 per CPU; unbounded:
/// RLIMIT_NPROC) depend on the host, so the worker sets its own and its
/// task count has a bound (`sandbox::tasks`) that `pids.max` can hold.
/// Set before the ring is enabled (restrictions forbid it after), so a
/// worker taken over by its image cannot raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IowqMax {
    /// Workers for regular files and block devices (our image I/O).
    pub bounded: u32,
    /// Workers for what may never complete (sockets, pipes): none of our
    /// rings queue such work, so 1 (0 would mean "the kernel's default").
    pub unbounded: u32,
}

impl IowqMax {
    /// The most a submitting thread brings along.
    pub const fn total(self) -> u32 {
        self.bounded + self.unbounded
    }
}

/// Make a ring for `spec`: disabled, sparse file table, restrictions in
/// place. The caller enables it (`register_enable_rings`) on the thread
/// that will submit; until then no SQE is accepted.
pub fn restricted(spec: &RingSpec<'_>) -> io::Result<Uring> {
    let mut b = IoUring::<squeue::Entry, cqueue::Entry>::builder();
    b.setup_r_disabled();
    if let Some(cq) = spec.cq_entries {
        b.setup_cqsize(cq);
    }
    if spec.single_issuer {
        b.setup_single_issuer().setup_defer_taskrun();
    }
    let ring = b
        .build(spec.sq_entries)
        .map_err(|e| annotate(e, spec.what, "io_uring_setup"))?;
    let sub = ring.submitter();
    // Stored in the ring: every thread whose io-wq starts with a request
    // on it gets these caps.
    let mut max = [spec.iowq.bounded, spec.iowq.unbounded];
    sub.register_iowq_max_workers(&mut max)
        .map_err(|e| annotate(e, spec.what, "io_uring_register(IOWQ_MAX_WORKERS)"))?;
    sub.register_files_sparse(spec.file_slots)
        .map_err(|e| annotate(e, spec.what, "io_uring_register(FILES, sparse)"))?;
    let fixed = squeue::Flags::FIXED_FILE.bits();
    let mut res: Vec<Restriction> = spec
        .opcodes
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    res.push(Restriction::sqe_flags_allowed(fixed));
    res.push(Restriction::sqe_flags_required(fixed));
    res.push(Restriction::register_op(IORING_REGISTER_FILES_UPDATE));
    sub.register_restrictions(&mut res)
        .map_err(|e| annotate(e, spec.what, "io_uring_register(RESTRICTIONS)"))?;
    Ok(ring)
}

/// Entries per image-file ring. A ring serves one request at a time for
/// one caller.
const FILE_RING_ENTRIES: u32 = 2;

/// io-wq caps of an image-file ring: its caller waits for its one request,
/// so one worker runs it if it must block.
pub const FILE_RING_IOWQ: IowqMax = IowqMax {
    bounded: 1,
    unbounded: 1,
};

/// Opcodes an image-file ring may run.
pub const FILE_OPCODES: [u8; 4] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// A restricted, enabled image-file ring with a sparse table of
/// `file_slots` files; which file is in which slot is `super::pool`'s
/// business.
pub struct Ring {
    ring: Uring,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// Make and enable a file ring (before seccomp, or in an unconfined
    /// process).
    pub fn new(file_slots: u32) -> io::Result<Ring> {
        let ring = restricted(&RingSpec {
            what: "an image-file ring",
            sq_entries: FILE_RING_ENTRIES,
            cq_entries: None,
            single_issuer: false,
            file_slots,
            opcodes: &FILE_OPCODES,
            iowq: FILE_RING_IOWQ,
        })?;
        ring.submitter()
            .register_enable_rings()
            .map_err(|e| annotate(e, "an image-file ring", "io_uring_register(ENABLE_RINGS)"))?;
        Ok(Ring { ring })
    }

    /// Put `fd` into `slot` (-1 clears it).
    pub fn set_slot(&self, slot: u32, fd: i32) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(slot, &[fd])
            .map(|_| ())
            .map_err(|e| annotate(e, "an image-file ring", "io_uring_register(FILES_UPDATE)"))
    }

    /// The raw ring, for attack tests that try what the restrictions forbid.
    pub fn into_raw(self) -> Uring {
        self.ring
    }

    /// Submit one entry and wait for its completion; the result is the
    /// CQE's non-negative `res`, or its negated errno as an error.
    ///
    /// # Safety
    /// Any buffer the entry points at must stay valid (and, for reads,
    /// exclusively borrowed) until this returns; since we always wait for
    /// the completion before returning, a borrow over this call suffices.
    pub unsafe fn run(&mut self, entry: squeue::Entry) -> io::Result<u32> {
        // SAFETY: the caller's promise, passed on.
        unsafe { run_one(&mut self.ring, entry) }
    }
}

/// Submit one entry on `ring` and wait for its completion.
///
/// # Safety
/// As [`Ring::run`]; the ring must have nothing else in flight.
pub unsafe fn run_one(ring: &mut Uring, entry: squeue::Entry) -> io::Result<u32> {
    // SAFETY: the caller guarantees the buffers outlive the operation,
    // and we do not return before the operation completed.
    unsafe {
        ring.submission()
            .push(&entry)
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(annotate(e, "a ring", "io_uring_enter")),
        }
        if let Some(cqe) = ring.completion().next() {
            let res = cqe.result();
            return if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res.unsigned_abs())
            };
        }
    }
}

/// Keep the errno (callers match on it) but say which step failed.
fn annotate(e: io::Error, what: &str, step: &str) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) if step == "io_uring_setup" => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{step} for {what}: {e} (is io_uring disabled by the kernel.io_uring_disabled sysctl?)"
            ),
        ),
        _ => io::Error::new(e.kind(), format!("{step} for {what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::types;
    use std::os::fd::AsRawFd;

    #[test]
    fn ring_refuses_unregistered_fds_other_opcodes_and_registrations() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let other = tempfile::tempfile().unwrap();
        other.set_len(4096).unwrap();
        let mut ring = Ring::new(4).unwrap();
        ring.set_slot(1, f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 512];
        // Allowed: read on the registered file.
        let ok = opcode::Read::new(types::Fixed(1), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        assert_eq!(unsafe { ring.run(ok) }.unwrap(), 512);
        // Refused: an empty slot.
        let empty = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        let e = unsafe { ring.run(empty) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
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
        // Refused: any registration but FILES_UPDATE.
        let e = ring
            .ring
            .submitter()
            .register_files(&[other.as_raw_fd()])
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let e = ring.ring.submitter().unregister_files().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // Clearing a slot makes it unusable again.
        ring.set_slot(1, -1).unwrap();
        let gone = opcode::Read::new(types::Fixed(1), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        let e = unsafe { ring.run(gone) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    /// The io-wq caps of the thread calling, read through a plain ring of
    /// its own (a zero changes nothing and the kernel answers the current
    /// values of the caller's io-wq).
    fn iowq_of_this_thread() -> [u32; 2] {
        let probe = Uring::new(2).unwrap();
        let mut max = [0u32; 2];
        probe
            .submitter()
            .register_iowq_max_workers(&mut max)
            .unwrap();
        max
    }

    /// Submit one read of `f` on `ring`, so that this thread's io-wq exists.
    fn first_use(ring: &mut Ring, f: &std::fs::File) {
        ring.set_slot(0, f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 512];
        let read = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 512).build();
        // SAFETY: buf outlives the call.
        assert_eq!(unsafe { ring.run(read) }.unwrap(), 512);
    }

    #[test]
    fn ring_thread_whose_first_ring_is_a_file_ring_gets_its_iowq_caps() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let mut ring = Ring::new(1).unwrap();
        let capped = std::thread::scope(|s| {
            s.spawn(|| {
                first_use(&mut ring, &f);
                iowq_of_this_thread()
            })
            .join()
            .unwrap()
        });
        assert_eq!(
            capped,
            [FILE_RING_IOWQ.bounded, FILE_RING_IOWQ.unbounded],
            "the kernel did not apply the ring's io-wq caps"
        );
        // Control: a thread whose io-wq starts on an uncapped ring gets the
        // kernel's own sizes (bounded from the SQ and CPUs, unbounded from
        // RLIMIT_NPROC), which the caps above replaced.
        let plain = std::thread::spawn(|| {
            let mut r = Uring::new(2).unwrap();
            let nop = opcode::Nop::new().build();
            // SAFETY: a no-op references no memory.
            unsafe { run_one(&mut r, nop) }.unwrap();
            iowq_of_this_thread()
        })
        .join()
        .unwrap();
        assert_ne!(plain, capped, "uncapped io-wq: {plain:?}");
        assert!(plain[1] > FILE_RING_IOWQ.unbounded, "{plain:?}");
    }

    /// The caps are fixed for the worker's life: an enabled, restricted
    /// ring refuses the registration, so a worker taken over by its image
    /// cannot change them (what bounds its tasks is still pids.max).
    #[test]
    fn ring_refuses_raising_its_iowq_caps_once_enabled() {
        let ring = Ring::new(1).unwrap();
        let mut max = [64u32, 64];
        let e = ring
            .ring
            .submitter()
            .register_iowq_max_workers(&mut max)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
}
