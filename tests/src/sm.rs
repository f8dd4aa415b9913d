//! XAPI's storage manager's way to a served disk, step by step (its
//! `Tapdisk.launch_on_tap`): `allocate`, `spawn`, `attach`, then `open`
//! with its options. Tests that check one step's refusal or one `open`
//! option start from [`Harness::sm_attach`].

use crate::{Harness, TenantSpec};
use std::path::PathBuf;

/// A minor with a tapdisk attached and no image open yet.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The minor number, as tap-ctl's `-m` takes it.
    pub minor: String,
    /// The tapdisk's pid, as `spawn` printed it (`-p`).
    pub pid: String,
    /// The block device `allocate` named.
    pub dev: PathBuf,
}

impl Attached {
    /// `open -p PID -m MINOR -a SPEC` followed by `extra`.
    pub fn open_args<'a>(&'a self, spec: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["open", "-p", &self.pid, "-m", &self.minor, "-a", spec];
        args.extend_from_slice(extra);
        args
    }
}

impl Harness {
    /// `allocate`, `spawn` and `attach` as `t`, each required to succeed.
    pub fn sm_attach(&self, t: &TenantSpec) -> Attached {
        let dev = PathBuf::from(self.ok(t, &["allocate"]).trim());
        let minor = dev
            .to_str()
            .and_then(|d| d.rsplit_once("tapdev"))
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| panic!("allocate named no tapdevN: {}", dev.display()));
        let pid = self.ok(t, &["spawn"]).trim().to_string();
        self.ok(t, &["attach", "-p", &pid, "-m", &minor]);
        Attached { minor, pid, dev }
    }
}
