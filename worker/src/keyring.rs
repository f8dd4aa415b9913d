//! The `-E` key a worker serves its encrypted VHDs with (`ToWorker::Key`).
//!
//! `open -E` gives the key before `Open`; it is kept while the image is
//! open so every `Unpause` reopens with it. `unpause -E` gives a key while
//! paused: it is *pending*, used by that `Unpause` only, and becomes the
//! key only if the reopen succeeds; a failed reopen drops it (zeroized),
//! so a wrong key leaves the disk paused with the key it had, and a plain
//! `unpause` still works. Keys live in this process's mlockall()ed memory
//! and [`Secret`] zeroizes them on drop.

use tapjail_common::secret::Secret;

/// Where the disk stands, as far as a key may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    Closed,
    Serving,
    Paused,
}

#[derive(Default)]
pub struct Keyring {
    current: Option<Secret>,
    pending: Option<Secret>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.is_some())
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl Keyring {
    /// `ToWorker::Key`: before `Open` it is the key; while paused it waits
    /// for the next `Unpause`; while serving it is refused (the open image
    /// already has its key, and swapping it under I/O would corrupt data).
    pub fn give(&mut self, key: Secret, state: DiskState) -> Result<(), &'static str> {
        match state {
            DiskState::Closed => self.current = Some(key),
            DiskState::Paused => self.pending = Some(key),
            DiskState::Serving => {
                return Err("Key comes before Open or Unpause, not while an image is served")
            }
        }
        Ok(())
    }

    /// The key an `Open` opens with.
    pub fn for_open(&self) -> Option<&Secret> {
        self.current.as_ref()
    }

    /// The key an `Unpause` reopens with: the pending one, else the kept.
    pub fn for_unpause(&self) -> Option<&Secret> {
        self.pending.as_ref().or(self.current.as_ref())
    }

    /// The `Unpause` is over: a pending key becomes the key if it
    /// succeeded, and is dropped otherwise.
    pub fn unpaused(&mut self, ok: bool) {
        if let (Some(k), true) = (self.pending.take(), ok) {
            self.current = Some(k);
        }
    }

    /// `Close`, or a failed `Open`: no key is kept.
    pub fn clear(&mut self) {
        self.current = None;
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> Secret {
        Secret::new(vec![b; 32])
    }

    fn first(s: Option<&Secret>) -> Option<u8> {
        s.map(|s| s.expose()[0])
    }

    #[test]
    fn a_key_given_while_paused_is_kept_only_if_the_unpause_succeeds() {
        let mut r = Keyring::default();
        r.give(k(1), DiskState::Closed).unwrap();
        assert_eq!(first(r.for_open()), Some(1));
        // A wrong key: the reopen fails, the old key stays.
        r.give(k(2), DiskState::Paused).unwrap();
        assert_eq!(first(r.for_unpause()), Some(2));
        r.unpaused(false);
        assert_eq!(first(r.for_unpause()), Some(1));
        // The right one: kept for later unpauses.
        r.give(k(3), DiskState::Paused).unwrap();
        r.unpaused(true);
        assert_eq!(first(r.for_unpause()), Some(3));
        // A plain unpause keeps what there is.
        r.unpaused(true);
        assert_eq!(first(r.for_unpause()), Some(3));
        r.clear();
        assert!(r.for_unpause().is_none());
    }

    #[test]
    fn a_key_is_refused_while_the_image_is_served() {
        let mut r = Keyring::default();
        r.give(k(1), DiskState::Closed).unwrap();
        assert!(r.give(k(2), DiskState::Serving).is_err());
        assert_eq!(first(r.for_unpause()), Some(1));
    }
}
