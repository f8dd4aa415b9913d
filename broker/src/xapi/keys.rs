//! `open -E` keys, per minor, for the disk's life.
//!
//! The broker keeps a disk's key in memory from the open that supplied it
//! until the disk is closed, another open replaces it, or the broker
//! exits: a respawned worker must be given it again, and nothing else can
//! give it (the key is never written to the state directory). Dropping a
//! [`Secret`] zeroizes it. Consequences: after a broker restart an adopted
//! disk keeps running (its worker holds the key), but should that worker
//! die, the respawn has no key and its open fails ("no key was given"),
//! so the minor is marked dead until `close` and `open -E` with the key.
//!
//! The key goes only to the worker of the minor it came with; it is never
//! audited, logged or put in a reply (the `Secret` type redacts).

use crate::error::BrokerError;
use crate::worker::WorkerConn;
use std::collections::HashMap;
use std::sync::Mutex;
use tapjail_common::secret::Secret;
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::Minor;

#[derive(Debug, Default)]
pub struct Keys(Mutex<HashMap<Minor, Secret>>);

impl Keys {
    /// Give `minor`'s worker its key before `Open`: a fresh open takes the
    /// running request's key (remembering it, or forgetting an old one),
    /// a respawn the remembered one. Nothing is sent without a key.
    pub fn send_key(
        &self,
        conn: &WorkerConn,
        minor: Minor,
        fresh: bool,
    ) -> Result<(), BrokerError> {
        let key = {
            let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if fresh {
                match super::scope::key() {
                    Some(k) => {
                        keys.insert(minor, k.clone());
                        Some(k)
                    }
                    None => {
                        keys.remove(&minor);
                        None
                    }
                }
            } else {
                keys.get(&minor).cloned()
            }
        };
        let Some(key) = key else { return Ok(()) };
        conn.expect(&ToWorker::Key(key), &[], &FromWorker::Ok)
            .map_err(BrokerError::from)
    }

    /// `unpause -E`: give the paused worker the request's key for the
    /// reopen about to be sent. The record is not touched yet: the worker
    /// keeps this key only if the reopen succeeds, and so must the broker
    /// ([`Keys::keep`]). `None` without `-E`.
    pub fn send_for_unpause(&self, conn: &WorkerConn) -> Result<Option<Secret>, BrokerError> {
        let Some(key) = super::scope::key() else {
            return Ok(None);
        };
        conn.expect(&ToWorker::Key(key.clone()), &[], &FromWorker::Ok)
            .map_err(|e| BrokerError::failed(format!("unpause -E: giving the key: {e}")))?;
        Ok(Some(key))
    }

    /// The reopen with an `unpause -E` key succeeded: it is `minor`'s key
    /// from now on (a respawn gets it), the old one dropped (zeroized).
    pub fn keep(&self, minor: Minor, key: Secret) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(minor, key);
    }

    /// The disk is closed: its key is dropped (zeroized).
    pub fn forget(&self, minor: Minor) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&minor);
    }
}
