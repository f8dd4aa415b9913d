//! What one XAPI-flagged request asks of the code beneath it, for as long
//! as the request runs on its thread: the `-t` deadline every worker answer
//! must meet, the cache plan of a fresh open, and the chain a `-e` clone
//! must share.
//!
//! Held in a thread-local because the worker exchange, the open and the
//! parent resolution sit several calls below the dispatch that knows the
//! flags; [`Scope::enter`] installs it and the guard removes it on every
//! way out (return, error, unwind), so nothing outlives its request.

use crate::table::FileId;
use std::cell::RefCell;
use std::time::{Duration, Instant};
use tapjail_common::xapi::CachePlan;
use tapjail_common::Minor;

/// The chain a `-e MINOR` clone must take its parents from.
#[derive(Debug, Clone)]
pub struct Shared {
    pub from: Minor,
    /// `from`'s files, leaf first.
    pub files: Vec<FileId>,
    /// How many parents the clone took from `from`.
    pub taken: std::cell::Cell<usize>,
}

/// One request's XAPI flags as the layers below need them.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `-t SECS`: when, and the SECS for the message.
    pub deadline: Option<(Instant, u32)>,
    pub plan: CachePlan,
    pub shared: Option<Shared>,
    /// `-2 URI [-s]`, as granted.
    pub mirror: Option<crate::mirror::Granted>,
    /// What the mirror hook did, for the outcome.
    pub mirror_done: RefCell<Option<crate::mirror::Done>>,
    /// `open -E`'s key, for [`super::keys::Keys::send_key`].
    pub key: Option<tapjail_common::secret::Secret>,
}

thread_local! {
    static CURRENT: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Removes the scope when the request is done.
#[derive(Debug)]
pub struct Entered(());

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl Scope {
    pub fn new(timeout_secs: Option<u32>) -> Scope {
        Scope {
            deadline: timeout_secs.map(|s| (Instant::now() + Duration::from_secs(u64::from(s)), s)),
            ..Scope::default()
        }
    }

    #[must_use]
    pub fn enter(self) -> Entered {
        CURRENT.with(|c| *c.borrow_mut() = Some(self));
        Entered(())
    }
}

fn with<T>(f: impl FnOnce(&Scope) -> T) -> Option<T> {
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

/// The running request's `-t` deadline and its SECS.
pub fn deadline() -> Option<(Instant, u32)> {
    with(|s| s.deadline).flatten()
}

/// The running request's cache plan (default outside a flagged request).
pub fn plan() -> CachePlan {
    with(|s| s.plan).unwrap_or_default()
}

/// The running request's `-2` (`None` outside a flagged request).
pub fn mirror() -> Option<crate::mirror::Granted> {
    with(|s| s.mirror.clone()).flatten()
}

/// Note what the mirror hook did (kept only inside a flagged request).
pub fn set_mirror_done(d: crate::mirror::Done) {
    with(|s| *s.mirror_done.borrow_mut() = Some(d));
}

/// What the mirror hook did in the running request.
pub fn mirror_done() -> Option<crate::mirror::Done> {
    with(|s| s.mirror_done.borrow().clone()).flatten()
}

/// The running request's `-E` key.
pub fn key() -> Option<tapjail_common::secret::Secret> {
    with(|s| s.key.clone()).flatten()
}

/// How many parents the running `-e` request shared (`None` without `-e`).
pub fn shared_taken() -> Option<usize> {
    with(|s| s.shared.as_ref().map(|sh| sh.taken.get())).flatten()
}

/// Whether the parent file `id`, the `depth`-th parent (1 = the leaf's
/// own) a `-e` clone asked for, is the one the shared minor has there.
/// `Ok` outside a `-e` request.
pub fn check_shared_parent(id: FileId, depth: usize) -> Result<(), String> {
    with(|s| match &s.shared {
        None => Ok(()),
        Some(sh) => match sh.files.get(depth - 1) {
            Some(f) if *f == id => {
                sh.taken.set(sh.taken.get() + 1);
                Ok(())
            }
            _ => Err(format!(
                "-e {}: this image's parent #{depth} is not the file minor {} serves at that place in its chain; \
                 the clone must be a child of the image minor {} serves",
                sh.from, sh.from, sh.from
            )),
        },
    })
    .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_lives_exactly_as_long_as_its_guard_even_through_a_panic() {
        assert!(deadline().is_none());
        {
            let _g = Scope::new(Some(5)).enter();
            assert_eq!(deadline().map(|d| d.1), Some(5));
        }
        assert!(deadline().is_none());
        let r = std::panic::catch_unwind(|| {
            let _g = Scope::new(Some(7)).enter();
            panic!("op failed");
        });
        assert!(r.is_err());
        assert!(
            deadline().is_none(),
            "an unwound request leaves no deadline behind"
        );
    }

    #[test]
    fn shared_parent_must_be_the_file_at_the_same_depth() {
        let mut s = Scope::new(None);
        s.shared = Some(Shared {
            from: Minor::new(4).unwrap(),
            files: vec![(1, 10), (1, 11)],
            taken: Default::default(),
        });
        let _g = s.enter();
        assert!(check_shared_parent((1, 10), 1).is_ok());
        assert!(check_shared_parent((1, 11), 2).is_ok());
        assert!(check_shared_parent((1, 11), 1).is_err());
        assert!(check_shared_parent((1, 12), 3).is_err());
        assert_eq!(shared_taken(), Some(2));
    }
}
