//! A progress bar on a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// Returns a callback `(done, total)` that drives a bar on stderr when
/// stderr is a terminal, and the bar (to finish) if there is one.
pub fn bar(what: &'static str) -> (Option<ProgressBar>, impl FnMut(u64, u64)) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(what);
        b
    });
    let b2 = bar.clone();
    let cb = move |done: u64, total: u64| {
        if let Some(b) = &b2 {
            b.set_length(total);
            b.set_position(done);
        }
    };
    (bar, cb)
}
