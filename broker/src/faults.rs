//! Fault injection for the broker's unit tests (compiled only in tests):
//! a panic at a named point inside an operation.

use std::cell::RefCell;

thread_local! {
    static PANIC_AT: RefCell<Option<&'static str>> = const { RefCell::new(None) };
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
