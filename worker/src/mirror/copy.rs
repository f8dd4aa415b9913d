//! The background copy (qemu drive-mirror's `sync=full`): every byte of
//! the primary goes to the secondary once, step by step, while guest
//! writes are mirrored. A step holds the mirror's gate exclusively, so no
//! guest write lands between its read of the primary and its write to the
//! secondary; a guest write after the step is mirrored by itself. The
//! thread holds the image only weakly: pause, close or a respawn end it,
//! and the next mirror starts from the beginning (it is never resumed
//! from a position the new primary may no longer match).

use super::{Mirrored, COPY_CHUNK};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

/// The copy thread only shuffles bytes through a heap buffer.
pub(super) const COPY_STACK: usize = 64 * 1024;

pub(super) fn start(m: &Arc<Mirrored>) -> std::io::Result<()> {
    let weak = Arc::downgrade(m);
    crate::frontend::spawn_thread_sized("mirror-copy", COPY_STACK, move || run(&weak)).map(drop)
}

fn run(weak: &Weak<Mirrored>) {
    let mut off = 0u64;
    loop {
        let Some(m) = weak.upgrade() else {
            return;
        };
        let mirror = &m.mirror;
        if mirror.failed() {
            return;
        }
        let size = m.primary.virtual_size();
        if off >= size {
            if mirror.with("flushing", |c| c.flush()).is_some() {
                mirror.synced.store(true, Relaxed);
                tapjail_common::log_line!("tapdisk: mirror to {} is in sync", mirror.uri);
            }
            return;
        }
        let n = (size - off).min(COPY_CHUNK);
        {
            let _step = mirror.gate.write().unwrap_or_else(|e| e.into_inner());
            let mut buf = mirror.buf.lock().unwrap_or_else(|e| e.into_inner());
            let buf = &mut buf[..n as usize];
            if let Err(e) = m.primary.read_at(buf, off) {
                mirror.fail(&format!(
                    "background copy: reading the primary at {off}: {e}"
                ));
                return;
            }
            if mirror
                .with("background copy", |c| c.write_at(buf, off))
                .is_none()
            {
                return;
            }
        }
        off += n;
        mirror.copied.store(off, Relaxed);
    }
}
