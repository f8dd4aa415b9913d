//! Opening the files an administrator names on a command line (the
//! policy, the audit log) so that a wrong path fails at once with a clear
//! message: a FIFO would block `open(2)` until a writer comes, and a
//! device like `/dev/zero` would be read forever into memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Open `path` for reading; anything but a regular file is refused.
pub fn open_regular(path: &Path) -> io::Result<File> {
    // Non-blocking, so that opening a FIFO does not wait for a writer.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {kind}, not a regular file"),
        ));
    }
    let fd = f.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on an fd we own; integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: fcntl(F_SETFL) on an fd we own; integer arguments only.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// The whole text of the regular file `path`, refused if it is larger
/// than `max` bytes or not UTF-8.
pub fn read_text(path: &Path, max: u64) -> io::Result<String> {
    let f = open_regular(path)?;
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is larger than {max} bytes"),
        )
    };
    if f.metadata()?.len() > max {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    // The file may grow after the check: never read more than max + 1.
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_text_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap()
            .success());
        let e = read_text(&p, 100).unwrap_err();
        assert!(e.to_string().contains("a FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn read_text_devices_directories_and_big_files_are_refused() {
        let e = read_text(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_text(dir.path(), 100).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'a'; 101]).unwrap();
        let e = read_text(&p, 100).unwrap_err();
        assert!(e.to_string().contains("larger than 100 bytes"), "{e}");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_text(&p, 100).is_err());
        std::fs::write(&p, "socket = \"/x\"\n").unwrap();
        assert_eq!(read_text(&p, 100).unwrap(), "socket = \"/x\"\n");
    }
}
