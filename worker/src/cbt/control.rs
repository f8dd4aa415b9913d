//! The broker's `Cbt` requests on a worker's disk: start, take over,
//! checkpoint, stop and list bitmaps. The log file arrives as an fd the
//! broker opened in the tenant's root; its bytes are parsed here only.

use super::log::{self, HEADER_LEN};
use super::{valid_name, Bitmap, CbtError, LogStore, Origin, Tracker};
use crate::disk::Disk;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use tapjail_common::cbt::{CbtInfo, ToWorkerCbt, GRANULARITY, XAPI_LOG_NAME};
use tapjail_common::worker_proto::FromWorker;

/// A log file: each write is made durable (`fdatasync`) before it returns.
#[derive(Debug)]
pub struct LogFile(pub File);

impl LogStore for LogFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)?;
        self.0.sync_data()
    }
}

/// Read what a disk of `disk_size` bytes needs of the log (its header and
/// the bitmap bytes covering the disk) with plain `read`s from the fd's
/// start; a bigger file is not read further, a shorter one is refused by
/// the parser.
fn read_log(file: &File, disk_size: u64) -> io::Result<Vec<u8>> {
    let want = HEADER_LEN + usize::try_from(log::bitmap_len(disk_size)).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; want];
    let mut got = 0;
    let mut f = file;
    while got < want {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn info(map: &Bitmap) -> CbtInfo {
    CbtInfo {
        name: map.name().to_string(),
        granularity: GRANULARITY,
        dirty: map.dirty_blocks(),
        blocks: map.blocks(),
        xapi_log: map.origin() == Origin::XapiLog,
    }
}

/// Every bitmap of the disk, for the reply.
pub fn list(tracker: &Tracker) -> Vec<CbtInfo> {
    tracker.all().iter().map(|m| info(m)).collect()
}

/// Carry out one request. `disk` is `None` when no image is open.
pub fn handle(
    tracker: &Tracker,
    disk: Option<&Disk>,
    req: ToWorkerCbt,
    mut fds: Vec<OwnedFd>,
) -> FromWorker {
    let with_fd = matches!(req, ToWorkerCbt::Start { .. } | ToWorkerCbt::Attach { .. });
    if fds.len() != usize::from(with_fd) {
        return FromWorker::Error(format!(
            "cbt: {req:?} takes {} fd(s), got {}",
            usize::from(with_fd),
            fds.len()
        ));
    }
    let done = match req {
        ToWorkerCbt::List => Ok(()),
        ToWorkerCbt::Start { name } | ToWorkerCbt::Attach { name, .. } if !valid_name(&name) => {
            Err(CbtError::BadName(name).to_string())
        }
        ToWorkerCbt::Start { name } => match (disk, fds.pop()) {
            (Some(disk), Some(fd)) => {
                let store = Box::new(LogFile(File::from(fd)));
                if tracker.get(&name).is_some() {
                    Err(CbtError::Exists(name).to_string())
                } else {
                    Bitmap::create(&name, disk.size(), store)
                        .map_err(CbtError::from)
                        .and_then(|m| tracker.add(m))
                        .map_err(|e| format!("cbt start {name}: {e}"))
                }
            }
            _ => Err("cbt start: no image is open".into()),
        },
        ToWorkerCbt::Attach { name, xapi } => match (disk, fds.pop()) {
            (Some(disk), Some(fd)) => attach(tracker, disk.size(), &name, xapi, File::from(fd)),
            _ => Err("cbt attach: no image is open".into()),
        },
        ToWorkerCbt::Checkpoint { name } => match (tracker.get(&name), disk) {
            (Some(map), Some(disk)) => disk
                .quiesced(|| map.checkpoint())
                .map_err(|source| CbtError::Checkpoint { name, source }.to_string()),
            (None, _) => Err(CbtError::Missing(name).to_string()),
            (_, None) => Err("cbt checkpoint: no image is open".into()),
        },
        ToWorkerCbt::Stop { name } => tracker.remove(&name).map(drop).map_err(|e| e.to_string()),
    };
    match done {
        Ok(()) => FromWorker::Cbt(list(tracker)),
        Err(e) => FromWorker::Error(e),
    }
}

fn attach(
    tracker: &Tracker,
    disk_size: u64,
    name: &str,
    xapi: bool,
    file: File,
) -> Result<(), String> {
    let bytes = read_log(&file, disk_size).map_err(|e| format!("reading CBT log {name}: {e}"))?;
    let origin = if xapi { Origin::XapiLog } else { Origin::Named };
    let (map, _header) = Bitmap::load(name, origin, disk_size, &bytes, Box::new(LogFile(file)))
        .map_err(|e| format!("CBT log {name}: {e}"))?;
    if xapi {
        // `unpause -c` names the log from now on: it replaces the old one.
        let _ = tracker.remove(XAPI_LOG_NAME);
    }
    tracker.add(map).map_err(|e| e.to_string())
}
