//! Where a request's time goes: a per-thread clock the broker's steps lap
//! as they finish, logged as one `tap-broker: phases ...` line per request.
//!
//! Off unless `TAPJAIL_PHASES=1` is in the broker's environment (a debug
//! knob for `bench/control-plane.sh`, not a policy key): then each lap is
//! one clock read and a push, and the line is written after the reply's
//! audit record. A client's request runs on that client's thread from
//! decision to reply, so a thread-local clock sees exactly its own steps;
//! steps on other threads (the deadline helpers) are lapped around their
//! join by the thread that waits for them.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable that turns the phase lines on.
pub const ENV: &str = "TAPJAIL_PHASES";

struct Clock {
    start: Instant,
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

thread_local! {
    static CLOCK: RefCell<Option<Clock>> = const { RefCell::new(None) };
}

/// Whether phase lines are on (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(ENV).is_ok_and(|v| v == "1"))
}

/// Start timing this thread's request.
pub fn begin() {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    CLOCK.with(|c| {
        *c.borrow_mut() = Some(Clock {
            start: now,
            last: now,
            laps: Vec::with_capacity(24),
        })
    });
}

/// The step `name` just finished: the time since the previous lap is
/// added to it (a step lapped twice, as a retried one, adds up).
pub fn lap(name: &'static str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    CLOCK.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            let d = now - c.last;
            c.last = now;
            match c.laps.iter_mut().find(|(n, _)| *n == name) {
                Some((_, t)) => *t += d,
                None => c.laps.push((name, d)),
            }
        }
    });
}

/// Stop timing and log the line for `op` (as `op=NAME key_us=N ...`,
/// `total_us` last); nothing if no clock was started on this thread.
pub fn end(op: &str) {
    if !enabled() {
        return;
    }
    lap("other");
    let Some(c) = CLOCK.with(|c| c.borrow_mut().take()) else {
        return;
    };
    tapjail_common::log_line!("{}", line(op, &c.laps, c.last - c.start));
}

fn line(op: &str, laps: &[(&'static str, Duration)], total: Duration) -> String {
    let mut s = format!("tap-broker: phases op={op}");
    for (name, d) in laps {
        s.push_str(&format!(" {name}_us={}", d.as_micros()));
    }
    s.push_str(&format!(" total_us={}", total.as_micros()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_each_phase_in_order_with_total_last() {
        let laps = [
            ("spawn", Duration::from_micros(1500)),
            ("audit", Duration::from_micros(20)),
        ];
        assert_eq!(
            line("create", &laps, Duration::from_micros(1600)),
            "tap-broker: phases op=create spawn_us=1500 audit_us=20 total_us=1600"
        );
    }
}
