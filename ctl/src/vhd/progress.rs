//! A progress bar for long offline work, on a terminal only: drawn on
//! stderr when both stdout and stderr are terminals (someone is watching
//! and nothing is being captured), never with `--quiet`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar that may not be shown. Its callback takes `(done, total)` in
/// bytes; [`Progress::finish`] draws the last state, 100%.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar labelled `what`, hidden when `quiet` or off a terminal.
    pub fn new(what: &'static str, quiet: bool) -> Progress {
        let show = !quiet && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        Progress(show.then(|| {
            // Not drawn until the engine says the total (a length of 0
            // would draw as 100% before any work was done).
            let b = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::hidden());
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        }))
    }

    /// The callback the engine calls as it goes.
    pub fn callback(&self) -> impl FnMut(u64, u64) {
        let bar = self.0.clone();
        move |done: u64, total: u64| {
            if let Some(b) = &bar {
                if b.is_hidden() {
                    b.set_draw_target(ProgressDrawTarget::stderr());
                }
                b.set_length(total);
                b.set_position(done.min(total));
            }
        }
    }

    /// The callback of a second pass, shown as `what` from its first call.
    pub fn phase(&self, what: &'static str) -> impl FnMut(u64, u64) {
        let bar = self.0.clone();
        let mut inner = self.callback();
        let mut started = false;
        move |done: u64, total: u64| {
            if !started {
                started = true;
                if let Some(b) = &bar {
                    b.set_message(what);
                }
            }
            inner(done, total)
        }
    }

    /// The work is done: show it complete (and leave the line).
    pub fn finish(self) {
        if let Some(b) = self.0 {
            if b.is_hidden() {
                b.set_draw_target(ProgressDrawTarget::stderr());
            }
            b.set_length(b.length().unwrap_or(0).max(b.position()));
            b.finish();
        }
    }
}
