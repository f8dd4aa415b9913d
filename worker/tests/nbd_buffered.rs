//! A confined tapdisk run with `--cache buffered`, where the NBD reader
//! answers page-cache hits itself (see `frontend::nbd::conn`): many reads
//! in flight over a differencing chain, hitting full parent blocks, partly
//! written leaf blocks (whose bitmaps force the slow path the first time),
//! holes and fresh writes, all return exactly the right bytes.

mod support;

use support::*;
use tapjail_ctl::files as vhdfs;
use tapjail_worker::image::vhd::{create::CreateKind, DEFAULT_BLOCK_SIZE};
use tapjail_worker::image::Image;

const MIB: u64 = 1 << 20;

#[test]
fn buffered_export_reads_through_a_chain_with_many_requests_in_flight() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let leaf = dir.path().join("leaf.vhd");
    vhdfs::create_path(&base, 16 * MIB, &CreateKind::dynamic()).unwrap();
    {
        let b = vhdfs::open_vhd(&base, false, Default::default()).unwrap();
        b.write_at(&vec![0x11u8; 8 * MIB as usize], 0).unwrap();
    }
    vhdfs::snapshot_path(&leaf, &base, DEFAULT_BLOCK_SIZE).unwrap();
    {
        let l = vhdfs::open_vhd(&leaf, false, Default::default()).unwrap();
        // Sectors 2..10 of the block at 2 MiB, and a leaf-only block.
        l.write_at(&[0x22u8; 4096], 2 * MIB + 1024).unwrap();
        l.write_at(&[0x33u8; 8192], 10 * MIB).unwrap();
    }
    let srv = Standalone::start(
        dir.path(),
        &format!("vhd:{}", leaf.display()),
        &["--cache", "buffered"],
    );
    // Each check twice: the first may miss (bitmap not loaded), the
    // second is answered on the reader thread.
    let checks = [
        "aio_read -P 0x11 0 4k",
        "aio_read -P 0x11 1M 64k",
        "aio_read -P 0x11 2M 1k",    // leaf block, sectors from the parent
        "aio_read -P 0x22 2049k 4k", // leaf block, the leaf's sectors
        "aio_read -P 0x11 2053k 4k", // and the parent's after them
        "aio_read -P 0x11 8388096 512", // the parent's last written sector
        "aio_read -P 0 8M 4k",       // beyond the parent's data
        "aio_read -P 0x33 10M 8k",   // leaf-only block
        "aio_read -P 0 10248k 4k",   // rest of it: zero
        "aio_read -P 0 15M 1M",      // a hole in both
    ];
    let mut cmds: Vec<&str> = Vec::new();
    for _ in 0..4 {
        cmds.extend(checks);
    }
    cmds.push("aio_flush");
    // A write, then reads of it (in the page cache now) and around it.
    cmds.extend([
        "write -P 0x44 3M 12k",
        "aio_read -P 0x44 3M 12k",
        "aio_read -P 0x44 3076k 4k",
        "aio_read -P 0x11 3084k 4k",
        "aio_flush",
    ]);
    let (ok, out) = qemu_io(&srv.url(), &cmds);
    assert!(ok, "{out}\n{}", srv.log());
    assert_eq!(
        out.matches("read ").count(),
        4 * checks.len() + 3,
        "every read completed: {out}"
    );
}
