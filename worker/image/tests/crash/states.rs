//! The state generator: the files a power cut at log position `p` can
//! leave behind.
//!
//! Per file, everything sent before its last completed sync (before `p`)
//! is on disk, and so is every FUA write that returned; of the rest, any
//! subset may have reached the disk, each write possibly torn at 512-byte
//! sector boundaries, and what did reach it is applied in the order it
//! was sent (a later write to a sector replaces an earlier one, as the
//! page cache would). A sector of a growing file that no applied write
//! covered reads as zeroes.

use crate::recorder::{write_into, Op};
use crate::rng::Rng;

/// How the unsynced writes before the crash point are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All of them, in order: the crash fell exactly at `p`.
    Prefix,
    /// A random subset of whole operations (reordering).
    Subset,
    /// A random subset of sectors of each write (torn writes).
    Torn,
}

/// Whether any operation before `p` is still optional (else every mode
/// gives the prefix state).
pub fn has_unsynced(log: &[Op], p: usize) -> bool {
    unsynced(log, p).iter().any(|&u| u)
}

fn unsynced(log: &[Op], p: usize) -> Vec<bool> {
    let mut synced_until = std::collections::HashMap::new();
    for (i, op) in log[..p].iter().enumerate() {
        if let Op::Sync { file } = op {
            synced_until.insert(*file, i);
        }
    }
    log[..p]
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let before_sync = synced_until.get(&op.file()).is_some_and(|&s| i < s);
            let fua = matches!(op, Op::Write { durable: true, .. });
            !(before_sync || fua || matches!(op, Op::Sync { .. }))
        })
        .collect()
}

/// The files after a crash at `p`.
pub fn build(bases: &[Vec<u8>], log: &[Op], p: usize, mode: Mode, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut files = bases.to_vec();
    let optional = unsynced(log, p);
    // Subsets favour a few different densities, not only one half.
    let keep = [1u64, 2, 3][rng.below(3) as usize];
    for (op, &opt) in log[..p].iter().zip(&optional) {
        if opt && mode == Mode::Subset && !rng.chance(keep, 4) {
            continue;
        }
        match op {
            Op::Write {
                file, off, data, ..
            } => {
                if opt && mode == Mode::Torn {
                    // Sectors of the file's 512-byte grid.
                    let mut at = *off;
                    let end = off + data.len() as u64;
                    while at < end {
                        let next = ((at / 512) + 1) * 512;
                        let next = next.min(end);
                        if rng.chance(keep, 4) {
                            let s = (at - off) as usize;
                            let e = (next - off) as usize;
                            write_into(&mut files[*file], &data[s..e], at);
                        }
                        at = next;
                    }
                } else {
                    write_into(&mut files[*file], data, *off);
                }
            }
            Op::SetLen { file, len } => {
                if opt && mode == Mode::Torn && !rng.chance(keep, 4) {
                    continue;
                }
                files[*file].resize(*len as usize, 0);
            }
            Op::Sync { .. } => {}
        }
    }
    files
}
