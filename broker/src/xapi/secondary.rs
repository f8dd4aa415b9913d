//! `-2 vhd:PATH` / `-2 aio:PATH`: the broker's half of a file secondary
//! (the worker's is `tapjail_worker::mirror::file`). SM's IntelliCache
//! leaf call names the VM's VDI on the shared SR this way.
//!
//! The file is opened like any writable image of the tenant, at every
//! open of it (open, unpause, respawn): the policy decides it again
//! (`decide_secondary_file`: her roots, writable tenant, no shared
//! read-only root), the broker opens it with her credentials beneath
//! the root (no symlinks, mount crossings), takes the writer lock and
//! claims it for the minor, so another minor or broker cannot write it.
//! The broker never reads a byte of it. Every decision is audited.
//!
//! The claim joins the image's own (`OpenImage::files`), so it is
//! released with the image and recorded for a successor broker.

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::mirror::Granted;
use crate::table::FileId;
use std::fs::File;
use tapjail_common::audit::Event;
use tapjail_common::mirror::MirrorTarget;
use tapjail_common::Minor;

impl Broker {
    /// Open `g`'s file for `minor` of tenant `owner`, claimed writable;
    /// `held` are the files the minor's image already holds (a secondary
    /// must be none of them: two writers of one file would corrupt it).
    pub(crate) fn open_secondary_file(
        &self,
        owner: &str,
        minor: Minor,
        g: &Granted,
        held: &[(FileId, bool)],
    ) -> Result<(File, FileId), BrokerError> {
        let MirrorTarget::File(_, path) = &g.target else {
            return Err(BrokerError::failed("-2: not a file secondary"));
        };
        let refuse = |rule: &str, why: String| {
            self.notice(
                Event::Mirror,
                None,
                Some(owner.to_string()),
                rule,
                format!("minor {minor}: -2 {}: refused: {why}", g.req.uri),
            );
            BrokerError::denied(format!("-2 {}: {why}; nothing was opened", g.req.uri))
        };
        let Some(open_as) = &g.open_as else {
            return Err(refuse(
                "mirror-file",
                "no identity to open the secondary as".into(),
            ));
        };
        let d = tapjail_policy::decide_secondary_file(&self.policy, owner, open_as, path);
        let Some(grant) = d.image.clone().filter(|_| d.allow) else {
            return Err(refuse(d.rule, d.reason));
        };
        let opened = self
            .open_grant(&grant, true, minor)
            .map_err(|e| refuse("broker-check", e.message))?;
        if held.iter().any(|(id, _)| *id == opened.id) {
            return Err(refuse(
                "mirror-file-same",
                format!(
                    "{} is the disk's own image file: a secondary is another file",
                    path.display()
                ),
            ));
        }
        self.table()
            .claim_files(minor, &[(opened.id, true)])
            .map_err(|e| refuse("broker-check", e.message))?;
        self.notice(
            Event::Mirror,
            None,
            Some(owner.to_string()),
            "mirror-file",
            format!(
                "minor {minor}: -2 {}: opened {} read-write for its tapdisk",
                g.req.uri,
                grant.path.display()
            ),
        );
        Ok((opened.file, opened.id))
    }
}

/// Whether the chain just opened reads the secondary as one of its own
/// files (a parent): refused, the secondary is written.
pub fn check_not_in_chain(
    secondary: Option<FileId>,
    files: &[(FileId, bool)],
) -> Result<(), BrokerError> {
    match secondary {
        Some(s) if files.iter().filter(|(id, _)| *id == s).count() > 1 => Err(BrokerError::denied(
            "-2: the secondary is also a file of the image's parent chain; a secondary is \
                 written, so it must be another file",
        )),
        _ => Ok(()),
    }
}
