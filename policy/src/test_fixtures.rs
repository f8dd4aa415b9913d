//! Fixtures the policy modules' unit tests share: two tenants, alice
//! (minor 1, uid 1000) and bob, an admin (minor 2, uid 1001).

use crate::config::Policy;
use crate::decide::{BrokerView, PeerCred};
use tapjail_common::Minor;

/// Minor 1 is alice's, minor 2 bob's; no workers, nothing counted.
pub struct View;

impl BrokerView for View {
    fn minor_owner(&self, minor: Minor) -> Option<&str> {
        match minor.get() {
            1 => Some("alice"),
            2 => Some("bob"),
            _ => None,
        }
    }
    fn worker_owner(&self, _: u32) -> Option<&str> {
        None
    }
    fn minors_of(&self, _: &str) -> usize {
        0
    }
    fn workers_of(&self, _: &str) -> usize {
        0
    }
}

/// Alice (writable, `/srv/alice`, plus `alice_extra` keys) and bob (admin,
/// `/srv/bob`, plus `bob_extra` keys).
pub fn two_tenants(alice_extra: &str, bob_extra: &str) -> Policy {
    Policy::parse(&format!(
        "[[tenant]]\nname = \"alice\"\nuids = [1000]\nimage_roots = [\"/srv/alice\"]\nwritable = true\n{alice_extra}\n\
         [[tenant]]\nname = \"bob\"\nuids = [1001]\nimage_roots = [\"/srv/bob\"]\n{bob_extra}admin = true\n"
    ))
    .unwrap()
}

pub const ALICE: PeerCred = PeerCred {
    pid: 1,
    uid: 1000,
    gid: 1000,
};
pub const BOB: PeerCred = PeerCred {
    pid: 2,
    uid: 1001,
    gid: 1001,
};
