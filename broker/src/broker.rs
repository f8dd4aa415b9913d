//! The broker: what every part of it shares. See the crate doc (`main.rs`)
//! for the modules and the lifecycle of a minor.

use crate::denials::Denials;
use crate::device::factory::DeviceFactory;
use crate::records::StateDir;
use crate::table::Table;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tapjail_common::audit::AuditLog;
use tapjail_policy::Policy;

/// How to start workers.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    pub tapdisk: PathBuf,
    /// Where each worker's control socket and stderr pipe are kept, so
    /// that it outlives this broker (see `tapjail_broker::fdstore`).
    pub store: Option<std::sync::Arc<tapjail_broker::fdstore::FdStore>>,
    /// RLIMIT_MEMLOCK (soft and hard), bytes.
    pub memlock: u64,
    /// For each message a worker sends, the whole of it.
    pub timeout: Duration,
    /// For a whole exchange of several messages (an open and every parent
    /// request it makes), so that a worker answering each message just in
    /// time cannot make it last for ever.
    pub op_timeout: Duration,
    /// Each worker's cgroup (`tapjail_broker::cgroup`).
    pub cgroups: std::sync::Arc<tapjail_broker::cgroup::Cgroups>,
}

/// The audit log and whether it still works.
#[derive(Debug)]
pub struct AuditState {
    pub log: AuditLog,
    /// Why the log is unusable; set once, then every request is refused.
    pub broken: Option<String>,
}

#[derive(Debug)]
pub struct Broker {
    pub policy: Policy,
    /// The audit recorder's log (`crate::audit`).
    pub(crate) audit: Mutex<AuditState>,
    /// Shares fsyncs of the audit log between concurrent requests.
    pub(crate) commit: crate::audit_commit::GroupCommit,
    /// Budgets for denials (taken before `audit`).
    pub(crate) denials: Mutex<Denials>,
    pub(crate) table: Mutex<Table>,
    /// Signalled whenever the supervisor records a worker's exit.
    pub(crate) exited: Condvar,
    pub devices: DeviceFactory,
    pub state: StateDir,
    pub spawn_cfg: SpawnConfig,
    /// eventfd that wakes the supervisor when workers are added.
    pub(crate) wake: OwnedFd,
    pub(crate) stopping: AtomicBool,
    /// Tenants' I/O limits as changed at runtime, and their shared buckets.
    pub(crate) qos: crate::qos::TenantsQos,
    /// Per-minor cache plans of `open -D` / `-e` (`crate::xapi`).
    pub(crate) xapi: crate::xapi::Plans,
    /// Per-minor write mirrors of `-2 URI` (`crate::mirror`).
    pub(crate) mirrors: crate::mirror::Mirrors,
}

impl Broker {
    pub fn new(
        policy: Policy,
        audit: AuditLog,
        devices: DeviceFactory,
        state: StateDir,
        spawn_cfg: SpawnConfig,
    ) -> std::io::Result<Broker> {
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let window = Duration::from_secs(u64::from(policy.audit_window_secs));
        Ok(Broker {
            policy,
            audit: Mutex::new(AuditState {
                log: audit,
                broken: None,
            }),
            commit: Default::default(),
            denials: Mutex::new(Denials::new(window)),
            table: Mutex::new(Table::default()),
            exited: Condvar::new(),
            devices,
            state,
            spawn_cfg,
            wake,
            stopping: AtomicBool::new(false),
            qos: crate::qos::TenantsQos::default(),
            xapi: crate::xapi::Plans::default(),
            mirrors: crate::mirror::Mirrors::default(),
        })
    }

    /// The table, even if a thread panicked while holding it (the table is
    /// kept consistent between statements, so its content stays usable).
    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}
