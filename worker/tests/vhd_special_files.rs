//! What is not an image file (a FIFO, a directory, a character device)
//! is refused at once by the offline tools, by name, instead of blocking
//! forever (opening a FIFO waits for a writer) or being read as an empty
//! or endless disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use tapjail_ctl::files::{
    check_path, convert_path, create_path, open_any, open_file, query_path, snapshot_path,
    ConvertTarget,
};
use tapjail_testsupport::{is_root, require};
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::ImageError;

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// Run `f` on another thread; fail the test if it does not return soon.
fn within_seconds<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} blocked for more than 10 s"))
}

fn assert_not_an_image(e: &ImageError, p: &Path, kind: &str) {
    let msg = e.to_string();
    assert!(
        msg.contains(&*p.to_string_lossy()) && msg.contains(kind) && msg.contains("not"),
        "{msg}"
    );
}

#[test]
fn open_file_fifo_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("fifo");
    mkfifo(&p);
    for read_only in [true, false] {
        let q = p.clone();
        let e =
            within_seconds("open_file on a FIFO", move || open_file(&q, read_only)).unwrap_err();
        assert_not_an_image(&e, &p, "FIFO");
    }
    let q = p.clone();
    let e = within_seconds("query_path on a FIFO", move || query_path(&q)).unwrap_err();
    assert_not_an_image(&e, &p, "FIFO");
    let q = p.clone();
    let e = within_seconds("open_any on a FIFO", move || open_any(&q).map(|_| ())).unwrap_err();
    assert_not_an_image(&e, &p, "FIFO");
}

#[test]
fn open_file_directory_and_char_device_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let e = open_file(&dir, true).unwrap_err();
    assert_not_an_image(&e, &dir, "directory");
    let zero = PathBuf::from("/dev/zero");
    let e = open_file(&zero, true).unwrap_err();
    assert_not_an_image(&e, &zero, "character device");
    let out = tmp.path().join("out.raw");
    let e = convert_path(&zero, &out, ConvertTarget::Raw, false, &mut |_, _| {}).unwrap_err();
    assert_not_an_image(&e, &zero, "character device");
    assert!(!out.exists());
}

#[test]
fn parent_replaced_by_a_fifo_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vhd");
    let child = tmp.path().join("child.vhd");
    create_path(&base, 1 << 20, &CreateKind::dynamic()).unwrap();
    snapshot_path(&child, &base, 1 << 21).unwrap();
    std::fs::remove_file(&base).unwrap();
    mkfifo(&base);
    let c = child.clone();
    assert!(
        within_seconds("open_any of a child whose parent is a FIFO", move || {
            open_any(&c).map(|_| ())
        })
        .is_err()
    );
    let c = child.clone();
    let problems = within_seconds("check_path of that child", move || check_path(&c)).unwrap();
    assert!(problems.iter().any(|p| p.field == "parent"), "{problems:?}");
}

/// A read-only loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn over(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_is_an_image_of_its_real_size() {
    if !require(is_root(), "needs root for a loop device") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("disk.img");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    let dev = Loop::over(&f);
    if !require(dev.is_some(), "losetup cannot attach a loop device here") {
        return;
    }
    let dev = dev.unwrap();
    let img = open_any(Path::new(&dev.0)).unwrap();
    assert_eq!(img.virtual_size(), data.len() as u64);
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == data, "the block device read back differently");
}
