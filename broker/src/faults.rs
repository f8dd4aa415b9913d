//! Fault injection for the broker's unit tests (compiled only in tests):
//! a panic at a named point inside an operation, or a failing audit write.

use crate::error::BrokerError;
use std::cell::{Cell, RefCell};

thread_local! {
    static PANIC_AT: RefCell<Option<&'static str>> = const { RefCell::new(None) };
    static AUDIT_FAILS_AFTER: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Panic the next time this thread reaches `point`.
pub fn panic_at(point: &'static str) {
    PANIC_AT.with(|p| *p.borrow_mut() = Some(point));
}

/// Called at `point`: panics if a test armed it.
pub fn hit(point: &'static str) {
    let armed = PANIC_AT.with(|p| p.borrow().is_some_and(|a| a == point));
    if armed {
        PANIC_AT.with(|p| *p.borrow_mut() = None);
        panic!("injected fault at {point}");
    }
}

/// Let `n` more audit writes through on this thread, then fail them.
pub fn audit_fails_after(n: u32) {
    AUDIT_FAILS_AFTER.with(|c| c.set(Some(n)));
}

pub fn audit_write() -> Result<(), BrokerError> {
    AUDIT_FAILS_AFTER.with(|c| match c.get() {
        Some(0) => Err(BrokerError::failed("injected audit failure")),
        Some(n) => {
            c.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}
