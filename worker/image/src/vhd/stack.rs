//! One VHD's own sectors over an image that is not its parent chain: how
//! a file secondary (blktap's `-2 vhd:PATH`) is read where blktap links it
//! into the list of images, between the leaf and the leaf's parents, or
//! in front of the leaf after a standby failover. blktap opens such a
//! secondary alone (not its own parents), and a sector it lacks goes on
//! down the list it was put into; [`read_own_then`] does that for a
//! single-file [`VhdImage`] with the caller's `below`.

use super::footer::DiskType;
use super::image::VhdImage;
use crate::{Image, ImageError};

/// A positioned read of what lies below.
pub type Below<'a> = dyn FnMut(&mut [u8], u64) -> Result<(), ImageError> + 'a;

/// Read `buf` at `offset`: sectors `img`'s leaf holds from it, the rest
/// from `below` when the leaf is differencing (zeroes otherwise, as the
/// format says). Encrypted images are refused: their sectors are read
/// whole through the chain, never piecewise like this.
pub fn read_own_then(
    img: &VhdImage,
    buf: &mut [u8],
    offset: u64,
    below: &mut Below<'_>,
) -> Result<(), ImageError> {
    let layer = img.leaf();
    if layer.cipher().is_some() {
        return Err(ImageError::InvalidArgument(format!(
            "{}: an encrypted VHD cannot be stacked over another image",
            layer.name()
        )));
    }
    let size = img.virtual_size();
    let end = offset
        .checked_add(buf.len() as u64)
        .filter(|e| *e <= size)
        .ok_or(ImageError::OutOfRange {
            offset,
            len: buf.len() as u64,
            size,
        })?;
    let mut done = 0usize;
    while (done as u64) < end - offset {
        let off = offset + done as u64;
        let max = end - off;
        let (n, loc) = layer.map(off, max).inspect_err(|_| {
            layer.counters.read_failed();
        })?;
        let n = n.clamp(1, max) as usize;
        let piece = &mut buf[done..done + n];
        match loc {
            Some(file_off) => layer.read_data(piece, file_off)?,
            None if layer.disk_type() == DiskType::Differencing => below(piece, off)?,
            None => piece.fill(0),
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::create::{create, CreateKind, ParentSpec};
    use crate::vhd::layer::VhdLayer;

    const MIB: u64 = 1 << 20;

    /// A differencing VHD opened alone (no parent), writable.
    fn lone_child() -> VhdImage {
        let f = tempfile::tempfile().unwrap();
        let parent = ParentSpec {
            uuid: [7; 16],
            timestamp: 1,
            name: "gold.vhd".into(),
            locators: vec![],
        };
        create(
            &f,
            4 * MIB,
            &CreateKind::Differencing {
                block_size: crate::vhd::DEFAULT_BLOCK_SIZE,
                parent,
            },
        )
        .unwrap();
        let layer = VhdLayer::open(Box::new(f), "sec", false, Default::default()).unwrap();
        VhdImage::from_layers(vec![layer]).unwrap()
    }

    #[test]
    fn own_sectors_come_from_the_file_the_rest_from_below() {
        let img = lone_child();
        img.write_at(&[0xAB; 1024], 3 * 512).unwrap();
        let mut buf = vec![0u8; 8 * 512];
        let mut asked = Vec::new();
        read_own_then(&img, &mut buf, 0, &mut |piece, off| {
            asked.push((off, piece.len()));
            piece.fill(0x11);
            Ok(())
        })
        .unwrap();
        assert_eq!(&buf[..3 * 512], &[0x11; 3 * 512][..]);
        assert_eq!(&buf[3 * 512..5 * 512], &[0xAB; 1024][..]);
        assert_eq!(&buf[5 * 512..], &[0x11; 3 * 512][..]);
        assert_eq!(asked, vec![(0, 3 * 512), (5 * 512, 3 * 512)]);
        let e = read_own_then(&img, &mut buf, 4 * MIB - 512, &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, ImageError::OutOfRange { .. }), "{e}");
    }
}
