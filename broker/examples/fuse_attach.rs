//! Developer tool: attach a raw image as a FUSE + loop block device without
//! a broker, serving it in-process (unconfined), to measure the frontend
//! on its own. Prints the loop device, holds it until stdin closes, then
//! tears it down.
//!
//! ```text
//! cargo run --release -p tapjail-broker --example fuse_attach -- IMAGE [THREADS] [ro]
//! ```

use std::io::Read;
use std::sync::Arc;
use tapjail_broker::device::fuse::{FuseBackend, FuseOptions};
use tapjail_broker::device::DeviceBackend;
use tapjail_worker::disk::Disk;
use tapjail_worker::frontend::fuse::{FuseConfig, FuseFrontend};
use tapjail_worker::frontend::Frontend;
use tapjail_worker::image::raw::RawImage;
use tapjail_worker::image::Image;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or_else(|| anyhow::anyhow!("usage: fuse_attach IMAGE [THREADS] [ro]"))?;
    let threads = args.get(1).map_or(Ok(4), |t| t.parse())?;
    let ro = args.get(2).is_some_and(|a| a == "ro");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!ro)
        .open(path)?;
    let image: Arc<dyn Image> = Arc::new(RawImage::open(Box::new(file), path, ro)?);
    let disk = Disk::new(image);
    let mut backend = FuseBackend::new(FuseOptions::new(format!("fuse_attach:{path}")));
    let mut prepared = backend.prepare(disk.size(), ro)?;
    let conn = prepared.fds.pop().ok_or_else(|| anyhow::anyhow!("no fd"))?;
    let mut fe = FuseFrontend::new(
        conn,
        FuseConfig {
            file_name: "disk".into(),
            resend: false,
            threads,
        },
    )?;
    fe.handshake(&disk)?;
    let served = disk.clone();
    let server = std::thread::spawn(move || fe.serve(served));
    let dev = backend.activate(std::process::id())?;
    println!("{}", dev.display());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    backend.teardown()?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    disk.close()?;
    Ok(())
}
