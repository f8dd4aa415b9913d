//! Interop with qemu: images qemu writes read byte-identical through our
//! engine, and images we write read back identically through qemu.

mod common;

use common::*;
use tapjail_worker::image::vhd::create::CreateKind;
use tapjail_worker::image::vhd::fs::create_path;
use tapjail_worker::image::Image;

#[test]
fn interop_our_dynamic_image_reads_back_identically_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ours.vhd");
    let size = 10 << 20;
    create_path(&p, size, &CreateKind::dynamic()).unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let img = open(&p, false);
        for (i, (off, len)) in [
            (0u64, 4096usize),
            (3 << 20, 100_000),
            (1000, 3),
            (size - 700, 700),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(i as u64 + 1, len);
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        assert_eq!(read_all(&img), model);
    }
    assert_eq!(qemu_virtual_size(&p), size);
    assert_eq!(qemu_raw(&p, dir.path()), model);
    let img = open(&p, true);
    assert_eq!(read_all(&img), model);
}
