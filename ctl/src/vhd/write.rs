//! `tap-ctl vhd write`: stdin into an image at an offset, all or nothing.

use super::{explain, on, MIB};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use tapjail_image::{Image, ImageError};

/// Most `tap-ctl vhd write` takes in one go: it holds the input and the
/// range's previous contents in memory to be all-or-nothing.
pub const MAX_WRITE: u64 = 64 * MIB;

/// All of `input` (at most [`MAX_WRITE`] bytes, exactly `expected` if
/// given), before anything is written.
pub(super) fn read_input(input: &mut impl Read, expected: Option<u64>) -> Result<Vec<u8>> {
    if let Some(l) = expected.filter(|l| *l > MAX_WRITE) {
        bail!(
            "-l {l} is more than tap-ctl vhd write takes at once ({MAX_WRITE} bytes): \
             split the input, or build the image with `tap-ctl vhd convert`; nothing was written"
        );
    }
    let mut data = Vec::new();
    input
        .take(MAX_WRITE + 1)
        .read_to_end(&mut data)
        .context("reading stdin; nothing was written")?;
    let got = data.len() as u64;
    if got > MAX_WRITE {
        bail!(
            "stdin holds more than {MAX_WRITE} bytes, the most tap-ctl vhd write takes at \
             once: split the input, or build the image with `tap-ctl vhd convert`; nothing \
             was written"
        );
    }
    if let Some(l) = expected.filter(|l| *l != got) {
        bail!("stdin held {got} bytes, not the {l} given with -l; nothing was written");
    }
    Ok(data)
}

/// Piece sizes of `tap-ctl vhd write`: writes, and comparisons when
/// putting old contents back.
const WRITE_CHUNK: usize = 4 << 20;
const RESTORE_PIECE: usize = 64 << 10;

/// Put `old` back at `offset`, piece by piece, writing only the pieces that
/// now read differently: a piece the failed write never changed (say, in
/// a block it could not allocate) is not written, so putting back does not
/// need the space that just ran out.
pub(super) fn restore(img: &dyn Image, old: &[u8], offset: u64) -> Result<(), ImageError> {
    let mut now = vec![0u8; RESTORE_PIECE.min(old.len())];
    for (i, piece) in old.chunks(RESTORE_PIECE).enumerate() {
        let at = offset + (i * RESTORE_PIECE) as u64;
        let cur = &mut now[..piece.len()];
        img.read_at(cur, at)?;
        if cur != piece {
            img.write_at(piece, at)?;
        }
    }
    img.flush()
}

/// Write `data` at `offset` of `img`, all or nothing: the range is checked
/// first, its previous contents saved, and if any write (or the flush)
/// fails they are written back. Only if that fails too may part of
/// `data` remain, and the error says which range to check.
pub(super) fn write_all_or_nothing(
    img: &dyn Image,
    name: &Path,
    data: &[u8],
    offset: u64,
) -> Result<()> {
    let size = img.virtual_size();
    let len = data.len() as u64;
    let Some(end) = offset.checked_add(len).filter(|e| *e <= size) else {
        bail!(
            "offset {offset} + {len} bytes of input is past the end of {} ({size} bytes); \
             nothing was written",
            name.display()
        );
    };
    if data.is_empty() {
        return Ok(());
    }
    let mut old = vec![0u8; data.len()];
    on(name, img.read_at(&mut old, offset))
        .context("reading the range's current contents; nothing was written")?;
    // How far the writes got (the failed one included): only that much
    // can need putting back.
    let mut tried = 0usize;
    let written = (|| {
        for chunk in data.chunks(WRITE_CHUNK) {
            let at = offset + tried as u64;
            tried += chunk.len();
            img.write_at(chunk, at)?;
        }
        img.flush()
    })();
    let Err(e) = written else {
        return Ok(());
    };
    let e = explain(name, e);
    match restore(img, &old[..tried], offset) {
        Ok(()) => Err(e.context(format!(
            "writing {len} bytes at offset {offset} failed; the previous contents were \
             written back, so none of the input was kept"
        ))),
        Err(undo) => Err(e.context(format!(
            "writing {len} bytes at offset {offset} failed, and so did writing the previous \
             contents back ({undo}): bytes {offset}..{end} of {} may hold part of the input",
            name.display()
        ))),
    }
}
