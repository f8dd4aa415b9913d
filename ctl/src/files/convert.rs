//! `tap-ctl vhd convert`: any source image, probed without guessing,
//! into a raw file or a dynamic or fixed VHD.

use super::{write_new_file_in, Local, Opener, Paths};
use std::fs::File;
use std::path::Path;
use tapjail_image::raw::RawImage;
use tapjail_image::vhd::convert::{copy_image, ImageSink, RawSink};
use tapjail_image::vhd::create::{create, CreateKind};
use tapjail_image::vhd::layer::VhdOptions;
use tapjail_image::Image;
use tapjail_image::{Backing, ImageError, ParentLocator, ParentOpener};

/// Output formats of [`convert_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTarget {
    Raw,
    VhdDynamic { block_size: u32 },
    VhdFixed,
}

/// What a source image is, as the user says (`-f`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Raw,
    Vhd,
}

/// Open any image by path for reading: VHD (with its chain) or raw,
/// probed without guessing ([`open_any_in`]).
pub fn open_any(path: &Path) -> Result<Box<dyn Image>, ImageError> {
    open_any_in(&mut Local::default(), path, None, false)
}

/// Open an image through `paths` as `format`, or, without one, as a VHD
/// if it shows any sign of being one and as raw only if it shows none: a
/// file that looks like a VHD but does not open as one is refused, never
/// silently taken for raw ([`tapjail_image::vhd::probe`]).
pub fn open_any_in<P: Paths + ?Sized>(
    paths: &mut P,
    path: &Path,
    format: Option<SourceFormat>,
    write: bool,
) -> Result<Box<dyn Image>, ImageError> {
    let f = paths.open(path, write)?;
    let name = path.to_string_lossy();
    let vhd = |paths: &mut P, f: File| -> Result<Box<dyn Image>, ImageError> {
        Ok(Box::new(tapjail_image::vhd::chain::open(
            Box::new(f),
            &name,
            !write,
            &mut Opener(paths),
            VhdOptions::default(),
        )?))
    };
    match format {
        Some(SourceFormat::Raw) => Ok(Box::new(RawImage::open(Box::new(f), &name, !write)?)),
        Some(SourceFormat::Vhd) => vhd(paths, f),
        None => match tapjail_image::vhd::probe::vhd_sign(&f)? {
            None => Ok(Box::new(RawImage::open(Box::new(f), &name, !write)?)),
            // A VHD whose footer or header does not parse is not taken
            // for raw; other errors (a missing parent) are the VHD's own.
            Some(sign) => vhd(paths, f).map_err(|e| match e {
                ImageError::Corrupt { .. } | ImageError::Unsupported(_) => {
                    ImageError::InvalidArgument(format!(
                        "{} shows {sign} but does not open as a VHD ({e}); it is not taken \
                     for raw: say `-f vhd` to see only the VHD error, or `-f raw` if it \
                     really is a raw disk image",
                        path.display()
                    ))
                }
                other => other,
            }),
        },
    }
}

/// Convert `src` (format probed) into a new file `dst` (which must not
/// exist; a failed conversion removes it again). With `sync` the
/// output is made durable before returning; like `cp` and `qemu-img
/// convert`, it is otherwise left to the page cache.
pub fn convert_path(
    src: &Path,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    convert_in(
        &mut Local::default(),
        src,
        None,
        dst,
        target,
        sync,
        progress,
    )
}

/// [`convert_path`] through `paths`, the source's format given or probed.
pub fn convert_in<P: Paths + ?Sized>(
    paths: &mut P,
    src: &Path,
    format: Option<SourceFormat>,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let image = open_any_in(paths, src, format, false)?;
    write_new_file_in(paths, dst, |out| {
        convert_into(image.as_ref(), out, dst, target, sync, progress)
    })
}

fn convert_into(
    image: &dyn Image,
    out: File,
    dst: &Path,
    target: ConvertTarget,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let size = image.virtual_size();
    match target {
        ConvertTarget::Raw => {
            out.set_len(size)
                .map_err(ImageError::io("truncate", size))?;
            copy_image(image, &RawSink(&out), progress)?;
            if sync {
                out.sync_data().map_err(ImageError::io("fsync", 0))?;
            }
            Ok(())
        }
        ConvertTarget::VhdDynamic { .. } | ConvertTarget::VhdFixed => {
            let vsize = size.div_ceil(512) * 512;
            let kind = match target {
                ConvertTarget::VhdDynamic { block_size } => CreateKind::Dynamic { block_size },
                _ => CreateKind::Fixed,
            };
            create(&out, vsize, &kind)?;
            // A new dynamic or fixed VHD has no parent to look for.
            let dst_img = tapjail_image::vhd::chain::open(
                Box::new(out),
                &dst.to_string_lossy(),
                false,
                &mut NoParents,
                VhdOptions {
                    sync_metadata: false,
                },
            )?;
            copy_image(image, &ImageSink(&dst_img), progress)?;
            if sync {
                dst_img.flush()
            } else {
                dst_img.leaf().write_back()
            }
        }
    }
}

/// The opener of an image that has no parent.
struct NoParents;

impl ParentOpener for NoParents {
    fn open_parent(
        &mut self,
        child: &str,
        _: &[ParentLocator],
        _: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        Err(ImageError::Parent(format!("{child} has no parent")))
    }
}
