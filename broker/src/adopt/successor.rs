//! The other side of adoption: a broker leaving its disks to the next one.

use super::*;

impl Broker {
    /// Stop serving and exit leaving every disk to a successor (a planned
    /// restart or upgrade): the workers keep serving, the store keeps
    /// their fds, nothing is torn down. The caller exits the process
    /// without dropping the broker (dropping would tear devices down).
    pub fn leave_for_successor(&self) {
        self.quiesce();
        self.flush_denials(true);
        let (disks, workers) = {
            let t = self.table();
            (
                t.disks.len(),
                t.workers.values().filter(|w| w.alive()).count(),
            )
        };
        self.notice(
            Event::BrokerStop,
            None,
            None,
            "handoff",
            format!(
                "tap-broker stopping, leaving {disks} minor(s) and {workers} live tapdisk(s) \
                 to the next tap-broker (SIGINT takes every disk down instead)"
            ),
        );
    }
}
