//! The checker: opens one crash state the way the worker would, runs
//! `check`, reads every sector back against the model, and where `check`
//! says `repair` fixes it, repairs a copy and checks and reads again.

use crate::model::{decode, Seen, View, SECTOR};
use crate::recorder::{MemFile, SharedMem};
use std::sync::Arc;
use tapjail_image::vhd::check::{check, Fix};
use tapjail_image::vhd::repair::repair;
use tapjail_image::vhd::{self, VhdOptions};
use tapjail_image::{Backing, Image, ImageError, ParentLocator, ParentOpener};

/// One disk a workload promises something about.
#[derive(Debug, Clone)]
pub struct Target {
    pub label: &'static str,
    /// File ids, leaf first.
    pub chain: Vec<usize>,
    pub view: View,
    /// States cut before this log position may refuse to open (a new file
    /// whose creation had not completed); from it on the image must open.
    pub must_open_from: usize,
    /// Virtual sizes the image may have (empty: the view's).
    pub sizes: Vec<u64>,
    /// A sector that may also read as these exact bytes: a known window,
    /// counted apart (a fixed image's old footer in the space a resize
    /// added, until the resize zeroes it).
    pub tolerated: Option<(u64, Vec<u8>)>,
}

/// A recorded workload, ready for crash states.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    pub bases: Vec<Vec<u8>>,
    pub log: Vec<crate::recorder::Op>,
    pub targets: Vec<Target>,
}

/// What one state showed.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// What `check` found that `repair` then fixed (its fields).
    pub repaired: Vec<&'static str>,
    /// A new file cut before its creation completed, refused cleanly.
    pub refused: bool,
    /// The target's tolerated sector read as its tolerated bytes.
    pub tolerated: bool,
}

/// Serves parents from the state's files by chain position.
struct Opener {
    files: Vec<Arc<MemFile>>,
    chain: Vec<usize>,
    depth: usize,
}

impl ParentOpener for Opener {
    fn open_parent(
        &mut self,
        _child: &str,
        _locators: &[ParentLocator],
        _uuid: [u8; 16],
    ) -> Result<(Box<dyn Backing>, String), ImageError> {
        self.depth += 1;
        let id = *self
            .chain
            .get(self.depth)
            .ok_or_else(|| ImageError::Parent("no such parent in the workload".into()))?;
        Ok((
            Box::new(SharedMem(self.files[id].clone())),
            format!("f{id}"),
        ))
    }
}

fn open(files: &[Arc<MemFile>], t: &Target) -> Result<vhd::VhdImage, ImageError> {
    let leaf = t.chain[0];
    let mut opener = Opener {
        files: files.to_vec(),
        chain: t.chain.clone(),
        depth: 0,
    };
    vhd::open(
        Box::new(SharedMem(files[leaf].clone())),
        &format!("f{leaf}"),
        true,
        &mut opener,
        VhdOptions::default(),
    )
}

/// Read every sector of `t` back and compare with what the model allows
/// at `p`.
fn verify(img: &vhd::VhdImage, t: &Target, p: usize) -> Result<bool, String> {
    let mut tolerated = false;
    let size = img.virtual_size();
    let sizes = if t.sizes.is_empty() {
        vec![t.view.sectors * SECTOR as u64]
    } else {
        t.sizes.clone()
    };
    if !sizes.contains(&size) {
        return Err(format!("virtual size {size}, expected one of {sizes:?}"));
    }
    let (ok, ever) = t.view.allowed(p);
    let n = (size / SECTOR as u64).min(t.view.sectors);
    let mut buf = vec![0u8; 64 * SECTOR];
    let mut s = 0u64;
    while s < n {
        let k = (n - s).min(64);
        let part = &mut buf[..k as usize * SECTOR];
        img.read_at(part, s * SECTOR as u64)
            .map_err(|e| format!("read at sector {s}: {e}"))?;
        for i in 0..k {
            let sec = s + i;
            let got = decode(&part[i as usize * SECTOR..][..SECTOR], sec);
            let allowed = &ok[sec as usize];
            match got {
                Seen::Id(id) if allowed.contains(&id) => {}
                Seen::Garbage
                    if t.tolerated.as_ref().is_some_and(|(ts, bytes)| {
                        *ts == sec && bytes[..] == part[i as usize * SECTOR..][..SECTOR]
                    }) =>
                {
                    tolerated = true
                }
                Seen::Id(id) if ever[sec as usize].contains(&id) => {
                    return Err(format!(
                        "LOST: sector {sec} reads write {id}, but one of {allowed:?} was durable"
                    ))
                }
                other => {
                    return Err(format!(
                        "GARBAGE: sector {sec} reads {other:?}, never written there \
                         (allowed {allowed:?})"
                    ))
                }
            }
        }
        s += k;
    }
    Ok(tolerated)
}

/// Check one crash state cut at `p`.
pub fn check_state(spec: &Spec, state: &[Vec<u8>], p: usize) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let files: Vec<Arc<MemFile>> = state
        .iter()
        .map(|f| Arc::new(MemFile::new(f.clone())))
        .collect();
    for t in &spec.targets {
        let img = match open(&files, t) {
            Ok(img) => img,
            Err(e) if p < t.must_open_from => {
                let _ = e;
                out.refused = true;
                continue;
            }
            Err(e) => return Err(format!("OPEN: {}: {e}", t.label)),
        };
        out.tolerated |= verify(&img, t, p).map_err(|e| format!("{}: {e}", t.label))?;
        drop(img);
        // Every file of the chain: check, and repair what it says repair fixes.
        for &id in &t.chain {
            let problems = check(files[id].as_ref());
            if problems.is_empty() {
                continue;
            }
            if let Some(bad) = problems.iter().find(|pr| pr.fix() != Fix::Repair) {
                return Err(format!(
                    "UNREPAIRABLE: {} file {id}: {bad} (all: {problems:?})",
                    t.label
                ));
            }
            let copy = Arc::new(MemFile::new(files[id].take()));
            let report = repair(copy.as_ref())
                .map_err(|e| format!("REPAIR: {} file {id}: {e} ({problems:?})", t.label))?;
            if !report.remaining.is_empty() {
                return Err(format!(
                    "REPAIR: {} file {id} still has {:?} after {:?}",
                    t.label, report.remaining, report.actions
                ));
            }
            let mut repaired = files.clone();
            repaired[id] = copy;
            let img = open(&repaired, t)
                .map_err(|e| format!("OPEN after repair: {} file {id}: {e}", t.label))?;
            verify(&img, t, p).map_err(|e| format!("after repair: {}: {e}", t.label))?;
            out.repaired.extend(problems.iter().map(|pr| pr.field));
        }
    }
    Ok(out)
}
