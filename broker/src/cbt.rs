//! Changed-block tracking, the broker's half: which log files each minor
//! tracks into, opened (and created, for `tap-ctl cbt start`) beneath the
//! tenant's roots with her credentials after a policy check, and handed to
//! the worker, which alone reads them.
//!
//! The list of a minor's logs is kept in `state_dir/cbt/MINOR.json`
//! (root-only, like the minors' records), so that a respawned worker gets
//! every log back before it serves again, also under a broker that
//! restarted meanwhile. A log that cannot be given back fails the bring-up
//! rather than serving writes no bitmap records.

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::image_open;
use crate::worker::WorkerConn;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tapjail_common::cbt::{CbtInfo, ToWorkerCbt, XAPI_LOG_NAME};
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;
use tapjail_policy::{decide_cbt_file, OpenAs};

/// One log a minor tracks into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtFile {
    pub name: String,
    pub path: PathBuf,
    /// XAPI's `-C`/`-c` log.
    pub xapi: bool,
}

thread_local! {
    /// The `-C`/`-c LOG` of the request running on this thread.
    static LOG: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Removes the request's log when it is done.
#[derive(Debug)]
pub struct LogScope(());

impl Drop for LogScope {
    fn drop(&mut self) {
        LOG.with(|l| l.borrow_mut().take());
    }
}

/// Make `log` the running request's `-C`/`-c` log.
#[must_use]
pub fn enter_log(log: Option<&str>) -> LogScope {
    LOG.with(|l| *l.borrow_mut() = log.map(PathBuf::from));
    LogScope(())
}

fn scope_log() -> Option<PathBuf> {
    LOG.with(|l| l.borrow().clone())
}

/// When in a bring-up the logs are handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// A new open: its `-C` log, if any, and nothing else.
    Open,
    /// A respawned worker: every log the minor had.
    Respawn,
    /// An unpause (the worker kept its bitmaps): its `-c` log, if any.
    Unpause,
}

/// Who the logs are opened for.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub minor: Minor,
    pub tenant: &'a str,
    pub open_as: &'a OpenAs,
}

impl Broker {
    fn cbt_path(&self, minor: Minor) -> PathBuf {
        self.state
            .sub_path("cbt")
            .join(format!("{}.json", minor.get()))
    }

    /// The logs `minor` tracks into, as last saved.
    pub fn cbt_files(&self, minor: Minor) -> Vec<CbtFile> {
        std::fs::read(self.cbt_path(minor))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Save `minor`'s logs (write then rename: a crash leaves the old
    /// list or the new one).
    pub fn save_cbt_files(&self, minor: Minor, files: &[CbtFile]) -> Result<(), BrokerError> {
        let path = self.cbt_path(minor);
        let save = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            if files.is_empty() {
                return match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(files).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, &path)
        };
        save().map_err(|e| {
            BrokerError::failed(format!(
                "saving the CBT logs of minor {minor} in {}: {e}",
                path.display()
            ))
        })
    }

    /// Open `file` for `who` (policy first) and hand it to the worker:
    /// `start` resets it to an empty bitmap, otherwise its marks are kept.
    pub fn cbt_attach(
        &self,
        who: Owner<'_>,
        conn: &WorkerConn,
        file: &CbtFile,
        start: bool,
    ) -> Result<Vec<CbtInfo>, BrokerError> {
        let d = decide_cbt_file(&self.policy, who.tenant, who.open_as, &file.path);
        let grant = match d.image {
            Some(g) if d.allow => g,
            _ => return Err(BrokerError::denied(d.reason)),
        };
        let deadline =
            std::time::Duration::from_secs(u64::from(self.policy.worker_timeout_secs.min(10)));
        let opened = if start {
            image_open::open_or_create(&grant, deadline, &|_| None)
        } else {
            image_open::open(&grant, true, deadline, &|_| None)
        }
        .map_err(|e| e.context(format!("CBT log {}", file.name)))?;
        let msg = if start {
            ToWorkerCbt::Start {
                name: file.name.clone(),
            }
        } else {
            ToWorkerCbt::Attach {
                name: file.name.clone(),
                xapi: file.xapi,
            }
        };
        match conn.call(&ToWorker::Cbt(msg), &[opened.file.as_fd()])? {
            FromWorker::Cbt(maps) => Ok(clean(maps)),
            _ => Err(BrokerError::failed(
                "the worker answered Cbt with something else",
            )),
        }
    }

    /// Hand the logs of this bring-up to the worker (see [`When`]) and
    /// save the minor's list. The worker has the disk open (or paused).
    pub fn cbt_bring_up(
        &self,
        who: Owner<'_>,
        conn: &WorkerConn,
        when: When,
    ) -> Result<(), BrokerError> {
        let log = scope_log().map(|path| CbtFile {
            name: XAPI_LOG_NAME.into(),
            path,
            xapi: true,
        });
        let (attach, keep) = match when {
            When::Open => (log.clone().into_iter().collect::<Vec<_>>(), Vec::new()),
            When::Respawn => (self.cbt_files(who.minor), Vec::new()),
            When::Unpause => {
                let Some(log) = log.clone() else {
                    return Ok(());
                };
                let mut kept = self.cbt_files(who.minor);
                kept.retain(|f| !f.xapi);
                (vec![log], kept)
            }
        };
        if attach.is_empty() && when != When::Open {
            return Ok(());
        }
        for file in &attach {
            self.cbt_attach(who, conn, file, false)?;
            if when == When::Respawn {
                tapjail_common::log_line!(
                    "tap-broker: minor {}: CBT log {} ({}) handed to the new worker",
                    who.minor,
                    file.name,
                    file.path.display()
                );
            }
        }
        if when != When::Respawn {
            let mut all = keep;
            all.extend(attach);
            self.save_cbt_files(who.minor, &all)?;
        }
        Ok(())
    }
}

/// Worker text is untrusted: bounded names, no control characters.
pub fn clean(maps: Vec<CbtInfo>) -> Vec<CbtInfo> {
    maps.into_iter()
        .take(64)
        .map(|mut m| {
            m.name = crate::worker::clean(&m.name);
            m
        })
        .collect()
}

use std::os::unix::fs::DirBuilderExt;

/// The log a named bitmap of the image at `leaf` lives in.
pub fn named_file(leaf: &Path, name: &str) -> CbtFile {
    CbtFile {
        name: name.to_string(),
        path: PathBuf::from(tapjail_common::cbt::named_path(
            &leaf.display().to_string(),
            name,
        )),
        xapi: false,
    }
}
