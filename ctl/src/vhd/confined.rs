//! The body of every image verb, run in the confined child.

use super::{
    errors::{hint, with_hint},
    write::write_all_or_nothing,
};
use super::{
    explain, mib, note_outside, on, progress, report, warn_block_size, OutFormat, VhdCommand,
    ENOSPC, MIB,
};
use anyhow::{bail, Context, Result};
use std::io::Write;
use tapjail_ctl::files::{self as vfs, ConvertTarget, Paths};
use tapjail_ctl::raw_parent as raw;
use tapjail_image::ImageError;

/// The body of every image verb, run in the confined child: files come
/// from `paths`. Returns the exit code.
pub(super) fn confined(
    command: VhdCommand,
    paths: &mut dyn Paths,
    input: Option<Vec<u8>>,
    quiet: bool,
) -> Result<i32> {
    match command {
        VhdCommand::Create { .. } => unreachable!("create runs unconfined"),
        VhdCommand::Key { .. } => unreachable!("vhd key runs in run_key"),
        VhdCommand::ConfineCheck { path } => {
            use std::os::unix::fs::OpenOptionsExt;
            // Both ways a path can be opened: libc's openat, and openat2.
            let std_open = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path);
            let raw = tapjail_ctl::sys::openat2(libc::AT_FDCWD, &path, libc::O_RDONLY, 0);
            let mut refused = true;
            for (how, r) in [("open", std_open.map(drop)), ("openat2", raw.map(drop))] {
                match r {
                    Ok(()) => {
                        refused = false;
                        println!("{how} {}: opened", path.display());
                    }
                    Err(e) => println!("{how} {}: refused: {e}", path.display()),
                }
            }
            return Ok(if refused { 0 } else { 1 });
        }
        VhdCommand::Snapshot {
            name,
            parent,
            block_size,
            raw_parent,
        } => {
            if raw_parent {
                // What is wrong with the parent is said about the parent.
                on(&parent, raw::raw_parent_spec_in(paths, &name, &parent))?;
                on(
                    &name,
                    raw::snapshot_raw_in(paths, &name, &parent, block_size),
                )?;
            } else {
                // What is wrong with the parent is said about the parent;
                // a raw file given without -m is told about -m.
                if let Err(e) = vfs::parent_spec_in(paths, &name, &parent) {
                    if let Some(h) = raw::raw_parent_hint(paths, &parent) {
                        return Err(anyhow::Error::new(e).context(h));
                    }
                    return Err(explain(&parent, e));
                }
                on(&name, vfs::snapshot_in(paths, &name, &parent, block_size))?;
            }
            warn_block_size(&name, block_size);
            note_outside(&name, &parent);
        }
        VhdCommand::Query {
            name,
            json,
            virtual_size,
            physical_size,
            parent,
            parent_path: _,
        } => {
            let info = on(&name, vfs::query_in(paths, &name))?;
            let only = if virtual_size {
                report::QueryOnly::VirtualSize
            } else if physical_size {
                report::QueryOnly::PhysicalSize
            } else if parent {
                report::QueryOnly::Parent
            } else {
                report::QueryOnly::All
            };
            report::query(&name, &info, only, json)?;
        }
        VhdCommand::Check { name, json, .. } => {
            let bar = progress::Progress::new("check", quiet || json);
            let problems = on(
                &name,
                vfs::check_in_with_progress(paths, &name, &mut bar.callback()),
            )?;
            bar.finish();
            if problems.len() == 1 && problems[0].field == "footer.cookie" {
                // No footer anywhere: say so if nothing else looks like a VHD.
                let f = on(&name, paths.open(&name, false))?;
                if on(&name, tapjail_image::vhd::probe::vhd_sign(&f))?.is_none() {
                    bail!(
                        "{} is not a VHD image (no footer, no dynamic header): if it is a raw \
                         disk image there is nothing to check (attach it as aio:PATH); if it \
                         was a VHD, restore it from a copy",
                        name.display()
                    );
                }
            }
            return report::check(&name, &problems, json);
        }
        VhdCommand::Repair { name, json } => {
            let bar = progress::Progress::new("repair", quiet || json);
            let done = on(
                &name,
                vfs::repair_in_with_progress(
                    paths,
                    &name,
                    &mut bar.callback(),
                    &mut bar.phase("repair, verifying"),
                ),
            )?;
            bar.finish();
            return report::repair(&name, &done, json);
        }
        VhdCommand::Read {
            name,
            offset,
            length,
            source_format,
            ..
        } => {
            let img = on(
                &name,
                vfs::open_any_in(paths, &name, source_format.get(), false),
            )?;
            // Refuse a range past the end before writing any of it.
            let size = img.virtual_size();
            if offset.checked_add(length).is_none_or(|end| end > size) {
                bail!(
                    "offset {offset} + length {length} is past the end of {} ({size} bytes); \
                     give -o and -l within the disk (`tap-ctl vhd query -n {}` shows its size)",
                    name.display(),
                    name.display()
                );
            }
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; length.min(4 * MIB) as usize];
            let mut done = 0u64;
            while done < length {
                let n = (length - done).min(buf.len() as u64) as usize;
                on(&name, img.read_at(&mut buf[..n], offset + done))?;
                out.write_all(&buf[..n]).context("writing to stdout")?;
                done += n as u64;
            }
            out.flush().context("writing to stdout")?;
        }
        VhdCommand::Write {
            name,
            offset,
            source_format,
            ..
        } => {
            let data = input.unwrap_or_default();
            let img = on(
                &name,
                vfs::open_any_in(paths, &name, source_format.get(), true),
            )?;
            write_all_or_nothing(img.as_ref(), &name, &data, offset)?;
        }
        VhdCommand::Convert {
            format,
            fixed,
            block_size,
            sync,
            source_format,
            src,
            dst,
            ..
        } => {
            let target = match (format, fixed) {
                (OutFormat::Raw, true) => bail!("--fixed only applies to -O vhd"),
                (OutFormat::Raw, false) => ConvertTarget::Raw,
                (OutFormat::Vhd, true) => ConvertTarget::VhdFixed,
                (OutFormat::Vhd, false) => ConvertTarget::VhdDynamic { block_size },
            };
            let bar = progress::Progress::new("convert", quiet);
            vfs::convert_in(
                paths,
                &src,
                source_format.get(),
                &dst,
                target,
                sync,
                &mut bar.callback(),
            )
            .map_err(|e| {
                // Say which side failed where the error says it.
                let h = match &e {
                    ImageError::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
                        format!(
                            "no space left to write {}: free some space and run the command \
                             again (the partial output was removed)",
                            dst.display()
                        )
                    }
                    ImageError::InvalidArgument(_) => {
                        format!("cannot convert {} to {}", src.display(), dst.display())
                    }
                    _ => hint(&e, &src),
                };
                with_hint(e, h)
            })?;
            if let ConvertTarget::VhdDynamic { block_size } = target {
                warn_block_size(&dst, block_size);
            }
            bar.finish();
        }
        VhdCommand::Coalesce { name, json, .. } => {
            let bar = progress::Progress::new("coalesce", quiet || json);
            let (parent, copied) = on(&name, vfs::coalesce_in(paths, &name, &mut bar.callback()))?;
            bar.finish();
            report::coalesced(&name, &parent, copied, json)?;
        }
        VhdCommand::Resize { name, size } => {
            // Metadata only (tables grow, a few blocks may move): the bar
            // goes from nothing to done.
            let bar = progress::Progress::new("resize", quiet);
            let bytes = mib(size)?;
            bar.callback()(0, bytes);
            on(&name, vfs::resize_in(paths, &name, bytes))?;
            bar.callback()(bytes, bytes);
            bar.finish();
        }
        VhdCommand::SetParent {
            name,
            parent,
            raw_parent,
        } => {
            if raw_parent {
                on(&name, raw::set_raw_parent_in(paths, &name, &parent))?;
            } else {
                on(&parent, vfs::parent_spec_in(paths, &name, &parent))?;
                on(&name, vfs::set_parent_in(paths, &name, &parent))?;
            }
            note_outside(&name, &parent);
        }
    }
    Ok(0)
}
