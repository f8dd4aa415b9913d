//! `-2 URI [-s]`: the broker's half of write mirroring (the worker's is
//! `tapjail_worker::mirror`). The policy decided the target with the
//! request (`mirror` key, rule `mirror-target`); here the broker connects
//! ([`connect`]) and hands the socket to the disk's worker before the
//! image is opened, and remembers the mirror per minor so that a
//! respawned worker or an `unpause` re-establishes it (a fresh connection,
//! the background copy from the start).
//!
//! `unpause -2 URI` has two meanings, told apart by the minor's record:
//! - the minor mirrors nothing: start mirroring to URI (blktap's meaning,
//!   how XAPI starts a storage migration);
//! - the minor mirrors to URI: switch the disk to serve from it, only if
//!   the worker says the mirror is in sync; otherwise refused, the disk
//!   stays paused (SM's end of a storage migration).
//!
//! A minor mirroring elsewhere refuses `unpause -2` to another URI.

pub mod connect;
pub mod record;

use crate::error::BrokerError;
use crate::worker::WorkerConn;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;
use tapjail_common::mirror::{MirrorRequest, MirrorTarget};
use tapjail_common::proto::ErrorKind;
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;

/// A mirror as granted: where, and what the connect must check.
#[derive(Debug, Clone)]
pub struct Granted {
    pub req: MirrorRequest,
    pub target: MirrorTarget,
    /// The policy's directory for a unix target (empty for TCP).
    pub dir: PathBuf,
    /// The tenant's uids (a unix socket must be root's or theirs).
    pub owners: Vec<u32>,
    /// A file secondary (`-2 vhd:PATH`): who opens it, decided again by
    /// the policy at every open (see [`crate::xapi::secondary`]).
    pub open_as: Option<tapjail_policy::OpenAs>,
}

impl Granted {
    /// Whether the secondary is a file (the disk of record, in SM's use).
    pub fn is_file(&self) -> bool {
        matches!(self.target, MirrorTarget::File(..))
    }
}

/// Opens a file secondary for the worker (policy, roots, locks, claims):
/// the broker's half lives in [`crate::xapi::secondary`].
pub type OpenFile<'a> = dyn Fn(&Granted) -> Result<std::fs::File, BrokerError> + 'a;

/// Why a worker is being given its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bring {
    /// `open` (or `create`): the request's `-2`, if any, replaces the record.
    Open,
    /// A respawned worker reopening: the record, if any.
    Respawn,
    /// `unpause`: the request's `-2` (start or switch), else the record.
    Unpause,
}

/// What happened, for the request's audited outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    None,
    Mirroring(String),
    Switched(String),
    /// Re-establishing failed: the disk serves without the mirror.
    Lost(String),
}

/// Each minor's mirror, and the mirrors a respawn or unpause could not
/// re-establish (URI, why), until the minor's next open.
#[derive(Debug, Default)]
pub struct Mirrors(
    Mutex<HashMap<Minor, Granted>>,
    Mutex<HashMap<Minor, (String, String)>>,
);

impl Mirrors {
    fn get(&self, minor: Minor) -> Option<Granted> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&minor)
            .cloned()
    }

    fn set(&self, minor: Minor, g: Option<Granted>) {
        self.1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&minor);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g {
            Some(g) => m.insert(minor, g),
            None => m.remove(&minor),
        };
    }

    /// Forget `minor`'s mirror (closed or destroyed).
    pub fn forget(&self, minor: Minor) {
        self.set(minor, None);
    }

    /// Before `Open`/`Unpause` is sent for `minor`: give its worker the
    /// mirror (or the switch) this bring-up calls for. An error refuses
    /// the request (nothing was opened yet); a respawn or plain unpause
    /// that cannot reconnect goes on without the mirror ([`Done::Lost`]).
    pub fn before_open(
        &self,
        conn: &WorkerConn,
        minor: Minor,
        bring: Bring,
        asked: Option<&Granted>,
        open_file: &OpenFile<'_>,
    ) -> Result<Done, BrokerError> {
        let record = self.get(minor);
        match (bring, asked) {
            (Bring::Open, None) => {
                self.forget(minor);
                Ok(Done::None)
            }
            (Bring::Open, Some(g)) => {
                send(conn, g, open_file)?;
                self.set(minor, Some(g.clone()));
                Ok(Done::Mirroring(g.req.uri.clone()))
            }
            (Bring::Unpause, Some(g)) => match record {
                Some(r) if r.req.uri == g.req.uri => {
                    conn.expect(
                        &ToWorker::MirrorSwitch {
                            uri: g.req.uri.clone(),
                        },
                        &[],
                        &FromWorker::Ok,
                    )
                    .map_err(|e| BrokerError::new(ErrorKind::Busy, e.to_string()))?;
                    self.forget(minor);
                    Ok(Done::Switched(g.req.uri.clone()))
                }
                Some(r) => Err(BrokerError::busy(format!(
                    "unpause -2 {}: minor {minor} mirrors to {}; -2 with that URI switches to it \
                     once it is in sync (the disk stays paused)",
                    g.req.uri, r.req.uri
                ))),
                None => {
                    send(conn, g, open_file)?;
                    self.set(minor, Some(g.clone()));
                    Ok(Done::Mirroring(g.req.uri.clone()))
                }
            },
            (Bring::Respawn | Bring::Unpause, None) => {
                let Some(r) = record else {
                    return Ok(Done::None);
                };
                match send(conn, &r, open_file) {
                    Ok(()) => Ok(Done::Mirroring(r.req.uri)),
                    // A file secondary is the disk of record (SM's VDI):
                    // serving without it would lose the guest's writes.
                    Err(e) if r.is_file() => Err(BrokerError::new(
                        e.kind,
                        format!(
                            "{}; the disk is not served without its file secondary",
                            e.message
                        ),
                    )),
                    Err(e) => {
                        tapjail_common::log_line!(
                            "tap-broker: minor {minor}: re-establishing the mirror to {} failed: {e}; \
                             the disk serves without it",
                            r.req.uri
                        );
                        self.forget(minor);
                        self.1
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(minor, (r.req.uri.clone(), e.to_string()));
                        Ok(Done::Lost(format!("{}: {e}", r.req.uri)))
                    }
                }
            }
            (Bring::Respawn, Some(_)) => {
                Err(BrokerError::failed("a respawn carries no -2 of its own"))
            }
        }
    }
}

impl Mirrors {
    /// A mirror the broker could not re-establish still shows in `stats`,
    /// as failed (blktap's `nbd_mirror_failed`): the new worker has none
    /// to report, and XAPI must not read that as a healthy mirror.
    pub fn fill_stats(&self, minor: Minor, ws: &mut tapjail_common::stats::WorkerStats) {
        if ws.mirror.is_some() {
            return;
        }
        if let Some((uri, why)) = self.1.lock().unwrap_or_else(|e| e.into_inner()).get(&minor) {
            ws.mirror = Some(tapjail_common::mirror::MirrorStats {
                uri: uri.clone(),
                mode: tapjail_common::mirror::MirrorMode::Mirror,
                state: tapjail_common::mirror::MirrorState::Failed,
                copied: 0,
                total: 0,
                mirrored_writes: 0,
                error: Some(format!(
                    "not re-established after a respawn or unpause: {why}"
                )),
            });
        }
    }
}

impl Mirrors {
    /// `list` rows of minors with a mirror (or one that was lost) say so;
    /// the rows' readers ask `stats` for the live state.
    pub fn fill_list(&self, rows: &mut [tapjail_common::proto::ListEntry]) {
        use tapjail_common::mirror::{MirrorMode, MirrorRecord};
        let live = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let lost = self.1.lock().unwrap_or_else(|e| e.into_inner());
        for r in rows.iter_mut().filter(|r| r.image.is_some()) {
            let Some(minor) = r.minor else { continue };
            r.mirror = match (live.get(&minor), lost.get(&minor)) {
                (Some(g), _) => Some(MirrorRecord {
                    uri: g.req.uri.clone(),
                    mode: if g.req.standby {
                        MirrorMode::Standby
                    } else {
                        MirrorMode::Mirror
                    },
                    lost: None,
                }),
                (None, Some((uri, why))) => Some(MirrorRecord {
                    uri: uri.clone(),
                    mode: MirrorMode::Mirror,
                    lost: Some(why.clone()),
                }),
                (None, None) => None,
            };
        }
    }
}

/// Connect to `g` (or open its file) and hand the socket (or file) to
/// the worker, which negotiates (or opens the image).
fn send(conn: &WorkerConn, g: &Granted, open_file: &OpenFile<'_>) -> Result<(), BrokerError> {
    let sock: std::os::fd::OwnedFd = if g.is_file() {
        open_file(g)?.into()
    } else {
        connect::connect(&g.target, &g.dir, &g.owners).map_err(|e| {
            BrokerError::new(
                ErrorKind::Failed,
                format!("-2 {}: {e}; nothing was opened", g.req.uri),
            )
        })?
    };
    conn.expect(
        &ToWorker::Mirror {
            uri: g.req.uri.clone(),
            standby: g.req.standby,
        },
        &[sock.as_fd()],
        &FromWorker::Ok,
    )
    .map_err(|e| BrokerError::failed(format!("-2 {}: {e}; nothing was opened", g.req.uri)))
}

/// The request outcome's words for what the mirror hook did.
pub fn outcome(d: &Done) -> String {
    match d {
        Done::None => String::new(),
        Done::Mirroring(u) => format!("; -2 {u}: mirroring"),
        Done::Switched(u) => format!("; -2 {u}: switched to the secondary"),
        Done::Lost(why) => format!("; mirror not re-established: {why}"),
    }
}
