//! A pseudo-terminal for tests of what tools print on a terminal (blktap's
//! `list` rows, progress bars): the child gets the slave as stdout and/or
//! stderr, the test reads everything it drew from the master.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, ExitStatus, Stdio};

/// A new pty pair (master, slave), 120 columns by 40 rows: a size of 0x0
/// would make some terminal libraries guess.
pub fn openpty() -> (OwnedFd, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into our locals; the name pointer may
    // be null, the termios one too, and `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Run `cmd` with both stdout and stderr on one pty (stdin null); returns
/// its status and all it wrote, `\r\n` turned into `\n`. The master is
/// read while the child runs, so a child that draws much never blocks.
pub fn run_on_pty(cmd: &mut Command) -> (ExitStatus, String) {
    let (master, slave) = openpty();
    let slave2 = slave.try_clone().expect("dup the pty slave");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::from(slave2))
        .spawn()
        .expect("spawn on a pty");
    // The Command keeps its Stdio (our slave fds) until replaced: close
    // them now, or the master never sees the child's last close.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        drain(master, &mut out);
        out
    });
    let status = child.wait().expect("wait");
    let out = reader.join().expect("pty reader");
    (status, String::from_utf8_lossy(&out).replace("\r\n", "\n"))
}

/// Read all that was written to the pty of `master` into `out`, until
/// every slave fd is closed (the read then fails with EIO).
pub fn drain(master: OwnedFd, out: &mut Vec<u8>) {
    let mut m = std::fs::File::from(master);
    let mut buf = [0u8; 4096];
    while let Ok(n) = m.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
}
