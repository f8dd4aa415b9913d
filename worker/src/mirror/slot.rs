//! The control loop's side of mirroring: the mirror negotiated for the
//! next `Open`/`Unpause`, the one the open disk has (kept across `pause`
//! for `MirrorSwitch` and stats), and whether the next `Unpause` serves
//! from its secondary.

use super::file::{FileMirror, FileMirrored, PendingFile};
use super::{Mirror, MirrorMode, Mirrored};
use crate::image::{Image, ImageError};
use crate::io::CacheMode;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tapjail_common::mirror::{MirrorStats, MirrorTarget};
use tapjail_common::worker_proto::FromWorker;

fn error(msg: impl std::fmt::Display) -> FromWorker {
    FromWorker::Error(msg.to_string())
}

fn single_fd(fds: &mut Vec<OwnedFd>) -> Option<OwnedFd> {
    if fds.len() == 1 {
        fds.pop()
    } else {
        None
    }
}

/// A worker's mirror: one negotiated for the next `Open`/`Unpause`, the
/// one the open disk has (kept across `pause`, for `MirrorSwitch` and
/// stats), and whether the next `Unpause` serves from its secondary.
#[derive(Debug, Default)]
pub struct MirrorSlot {
    pending: Option<Arc<Mirror>>,
    pub(crate) current: Option<Arc<Mirror>>,
    pub(crate) switch: bool,
    /// A file secondary (`-2 vhd:PATH`) for the next `Open`/`Unpause`,
    /// and the one the open disk has: see [`super::file`].
    pending_file: Option<PendingFile>,
    file: Option<Arc<FileMirror>>,
    /// The plan's leaf-mode `-r` for the next file secondary.
    pub(crate) leaf_fill: bool,
}

impl MirrorSlot {
    /// The image to serve for the chain just opened: mirrored when a
    /// mirror is pending. Any earlier mirror is let go.
    pub fn wrap(&mut self, img: Arc<dyn Image>) -> Result<Arc<dyn Image>, ImageError> {
        if let Some(old) = self.current.take() {
            old.disconnect();
        }
        self.file = None;
        if let Some(p) = self.pending_file.take() {
            let (wrapped, state) = FileMirrored::wrap(img, p)?;
            self.file = Some(state);
            return Ok(wrapped);
        }
        let Some(m) = self.pending.take() else {
            return Ok(img);
        };
        let wrapped = Mirrored::wrap(img, m.clone())?;
        self.current = Some(m);
        Ok(wrapped)
    }

    /// Whether the open disk mirrors (to NBD or a file).
    pub fn active(&self) -> bool {
        self.current.is_some() || self.file.is_some()
    }

    /// The open disk's mirror, for `stats`.
    pub fn stats(&self) -> Option<MirrorStats> {
        match (&self.current, &self.file) {
            (Some(m), _) => Some(m.stats()),
            (None, Some(f)) => Some(f.stats()),
            (None, None) => None,
        }
    }

    /// Leaf-mode `-r` counters, for `stats` (`read_cache`).
    pub fn fill_stats(&self) -> Option<tapjail_common::read_cache::ReadCacheStats> {
        self.file.as_ref().and_then(|f| f.fill_stats())
    }

    pub fn clear(&mut self) {
        self.leaf_fill = false;
        self.pending_file = None;
        self.file = None;
        for m in [self.pending.take(), self.current.take()]
            .into_iter()
            .flatten()
        {
            m.disconnect();
        }
        self.switch = false;
    }

    /// `Mirror`: negotiate with the secondary the broker connected, for
    /// the next `Open` or `Unpause`.
    pub fn mirror_to(
        &mut self,
        uri: String,
        standby: bool,
        mut fds: Vec<OwnedFd>,
        serving: bool,
        cache: CacheMode,
    ) -> FromWorker {
        if serving {
            return error("Mirror comes before Open or Unpause, not while the disk is served");
        }
        let Some(sock) = single_fd(&mut fds) else {
            return error("Mirror needs exactly one fd (the connected socket or file)");
        };
        let mode = if standby {
            MirrorMode::Standby
        } else {
            MirrorMode::Mirror
        };
        // A new mirror replaces the paused disk's old one; its buffer goes
        // before the new one is allocated (memory is locked and budgeted).
        self.switch = false;
        self.pending_file = None;
        self.file = None;
        // The broker's own text: it parsed and opened it.
        if let Ok(MirrorTarget::File(kind, _)) = MirrorTarget::parse(&uri) {
            for old in [self.current.take(), self.pending.take()]
                .into_iter()
                .flatten()
            {
                old.disconnect();
            }
            self.pending_file = Some(PendingFile {
                uri,
                kind,
                mode,
                file: sock,
                cache,
                fill: self.leaf_fill,
            });
            return FromWorker::Ok;
        }
        for old in [self.current.take(), self.pending.take()]
            .into_iter()
            .flatten()
        {
            old.disconnect();
        }
        match Mirror::connect(std::fs::File::from(sock), uri.clone(), mode) {
            Ok(m) => {
                if let Some(old) = self.pending.replace(m) {
                    old.disconnect();
                }
                FromWorker::Ok
            }
            Err(e) => error(format!("negotiating NBD with the secondary {uri}: {e}")),
        }
    }

    /// `MirrorSwitch`: allowed only while paused with a mirror to `uri`
    /// that is in sync.
    pub fn mirror_switch(&mut self, uri: &str, paused: bool) -> FromWorker {
        if !paused {
            return error("unpause -2: the disk is not paused");
        }
        if let Some(f) = &self.file {
            return error(format!(
                "unpause -2 {uri}: this disk mirrors to the file {}, which is written along \
                 with the leaf, not switched to: unpause -a TYPE:PATH to serve that file",
                f.uri()
            ));
        }
        let Some(m) = &self.current else {
            return error(format!(
                "unpause -2 {uri}: this disk mirrors to no secondary"
            ));
        };
        if m.uri() != uri {
            return error(format!(
                "unpause -2 {uri}: this disk mirrors to {}, not {uri}",
                m.uri()
            ));
        }
        let s = m.stats();
        if m.mode() != MirrorMode::Mirror || !m.synced() {
            return error(format!(
                "unpause -2 {uri}: the secondary is not in sync (mirror {}, {} of {} bytes copied{}); \
                 the disk stays paused on its primary: unpause without -2, wait for stats to say \
                 synced, then pause and unpause -2 again",
                s.state.as_str(),
                s.copied,
                s.total,
                s.error.map(|e| format!(", {e}")).unwrap_or_default()
            ));
        }
        self.switch = true;
        FromWorker::Ok
    }
}
