//! Per-minor state bits, numerically identical to blktap's so that scripts
//! that read `tap-ctl list` keep working.

use serde::{Deserialize, Serialize};

/// blktap's `TAPDISK_VBD_*` style flags as `tap-ctl list` prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct State(pub u32);

impl State {
    pub const DEAD: u32 = 0x1;
    pub const CLOSED: u32 = 0x2;
    pub const QUIESCE_REQUESTED: u32 = 0x4;
    pub const QUIESCED: u32 = 0x8;
    pub const PAUSE_REQUESTED: u32 = 0x10;
    pub const PAUSED: u32 = 0x20;
    pub const SHUTDOWN_REQUESTED: u32 = 0x40;

    pub fn contains(self, bit: u32) -> bool {
        self.0 & bit == bit
    }

    pub fn with(self, bit: u32) -> Self {
        State(self.0 | bit)
    }

    pub fn without(self, bit: u32) -> Self {
        State(self.0 & !bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bits_match_blktap() {
        let s = State::default().with(State::PAUSED).with(State::CLOSED);
        assert_eq!(s.0, 0x22);
        assert!(s.contains(State::PAUSED));
        assert!(!s.without(State::PAUSED).contains(State::PAUSED));
    }
}
