//! `tap-broker`: the privileged half. Decides, opens, creates devices,
//! spawns confined workers; never reads image contents.
//!
//! Runs in the foreground (systemd `Type=simple`), logs to stderr.
//! SIGTERM (`systemctl stop`/`restart`, an upgrade) stops it and leaves
//! every disk served: the workers keep running, their fds are kept (see
//! `tapjail_broker::fdstore`), and the next tap-broker adopts them
//! (`adopt`). SIGINT (Ctrl-C) destroys every disk first, as does `--down`.
//!
//! # Modules, top to bottom (each uses only those below it)
//!
//! - `server`: the control socket, one thread per client.
//! - `dispatch`: request → policy → audited decision → operation → reply.
//! - `ops`: the operations, one module per group of verbs.
//! - `supervisor`: workers started (confinement checked), watched, reaped,
//!   stopped, respawned.
//! - `bringup`: an image opened beneath its root, its chain opened by the
//!   worker (parents decided and audited), the device created.
//! - `audit`: the recorder; every audit line is built there.
//! - `broker`: what all of the above share (policy, tables, audit log).
//! - `lease`, `lifecycle`, `table`: a minor's phase, the lease operations
//!   hold it by, and the tables of minors, workers and open files.
//! - `adopt`: a predecessor's workers and devices taken over at start;
//!   `resync`: a taken-over control stream brought back in step.
//! - `worker` (a worker's control socket), `device` (kernel backends),
//!   `records` (`state_dir`), `publish`, `denials`, `sys` (syscalls).
//!
//! # A minor's life (phases × verbs)
//!
//! ```text
//!             Allocated    Attached       Serving        Paused        Dead
//! allocate    (new)
//! attach      → Attached   busy           busy           busy          busy
//! open        no worker    → Serving      busy           busy          dead
//! pause       no worker    no image       → Paused       busy          dead
//! unpause     no worker    not paused     not paused     → Serving     dead
//! stats       no worker    ok             ok             ok            dead
//! close       no worker    no image       → Attached*    → Attached*   → Dead*
//! detach      no worker    → Allocated    busy           busy          → Allocated
//! free        → (freed)    busy           busy           busy          → (freed)
//! destroy     → (freed)    → (freed)      → (freed)      → (freed)     → (freed)
//! create      (new) → Serving, or nothing on failure
//! worker dies              → Dead         → Dead         → Dead
//! respawn                                                              → Serving
//! ```
//!
//! `*` marks blktap's CLOSED bit. `respawn` applies to a dead minor that
//! was serving and not paused (`Phase::wants_respawn`). Every move from
//! one column to another happens through a lease; a request on a leased
//! minor is refused as busy.

mod adopt;
mod audit;
mod audit_commit;
mod bringup;
mod broker;
mod cbt;
mod denials;
mod dispatch;
#[cfg(test)]
mod docs;
use tapjail_broker::device;
mod error;
#[cfg(test)]
mod faults;
mod host_limits;
mod image_open;
mod lease;
mod lifecycle;
mod log_reader;
mod mirror;
mod ops;
mod publish;
mod qos;
mod qos_records;
mod records;
mod resync;
mod server;
mod stop_point;
mod supervisor;
use tapjail_broker::sys;
mod table;
mod worker;
mod worker_log;
mod xapi;

use anyhow::{bail, Context};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tapjail_broker::fdstore::FdStore;
use tapjail_common::audit::{AuditLog, Event};
use tapjail_policy::Policy;

#[derive(Debug, Parser)]
#[command(
    name = "tap-broker",
    version,
    about = "tapjail's privileged broker: serves tap-ctl, decides by policy, audits, spawns confined tapdisk workers"
)]
struct Args {
    /// Policy file (TOML). Without it: the embedded default, which serves
    /// root only, on /run/tapjail/broker.sock, images under /var/lib/tapjail.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Print the embedded default policy and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Take every disk down (adopting what a previous tap-broker left,
    /// then destroying it all) and exit, instead of serving.
    #[arg(long)]
    down: bool,
    /// Internal: run as the fd holder tap-broker starts for itself.
    #[arg(long, hide = true)]
    fd_holder: bool,
    /// Internal: run as the image opener tap-broker starts for itself.
    #[arg(long, hide = true)]
    open_helper: bool,
}

fn load(path: Option<&Path>) -> anyhow::Result<Policy> {
    match path {
        None => Ok(Policy::embedded_default()),
        Some(p) => {
            let text =
                tapjail_common::adminfile::read_text(p, tapjail_policy::config::MAX_POLICY_BYTES)
                    .with_context(|| format!("cannot read {}", p.display()))?;
            let policy = Policy::parse(&text).map_err(|e| {
                anyhow::anyhow!(
                    "invalid policy:\n{}",
                    e.render(&p.display().to_string()).trim_end()
                )
            })?;
            let warnings = Policy::warnings(&text, &tapjail_policy::RootProbe::look);
            eprint!(
                "{}",
                tapjail_policy::render_warnings(&warnings, &format!("tap-broker: {}", p.display()))
            );
            Ok(policy)
        }
    }
}

fn tapdisk_path(policy: &Policy) -> anyhow::Result<PathBuf> {
    let path = match &policy.tapdisk {
        Some(p) => p.clone(),
        None => default_tapdisk(
            &std::env::current_exe().context("locating tap-broker's own executable")?,
        ),
    };
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "worker binary {} (set `tapdisk = ...` in the policy)",
            path.display()
        )
    })?;
    if !meta.is_file() || std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0
    {
        bail!("worker binary {} is not an executable file", path.display());
    }
    Ok(path)
}

/// Where the package installs the worker (tap-broker is in /usr/sbin).
const LIBEXEC_TAPDISK: &str = "/usr/libexec/tapjail/tapdisk";

/// Without `tapdisk = ...` in the policy: `tapdisk` next to tap-broker (a
/// build tree), else the package's `/usr/libexec/tapjail/tapdisk`.
fn default_tapdisk(broker_exe: &Path) -> PathBuf {
    let sibling = broker_exe.with_file_name("tapdisk");
    if sibling.exists() {
        sibling
    } else {
        PathBuf::from(LIBEXEC_TAPDISK)
    }
}

/// RLIMIT_MEMLOCK for workers: the configured amount, raised on the
/// broker itself first (workers inherit the hard limit). Without
/// CAP_SYS_RESOURCE the hard limit cannot grow; then workers get what the
/// broker has, and the operator is told.
fn memlock_for_workers(wanted: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Memlock);
    let new = Rlimit {
        current: cur.current,
        maximum: Some(wanted).max(cur.maximum.map(|m| m.max(wanted))),
    };
    if cur.maximum.is_none_or(|m| m >= wanted) || setrlimit(Resource::Memlock, new).is_ok() {
        return wanted;
    }
    let hard = cur.maximum.unwrap_or(wanted);
    tracing::warn!(
        "worker_memlock_mib asks {} MiB but the hard RLIMIT_MEMLOCK is {} KiB and tap-broker lacks CAP_SYS_RESOURCE to raise it; workers get {} KiB",
        wanted >> 20,
        hard >> 10,
        hard >> 10
    );
    hard
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", tapjail_policy::config::EMBEDDED_DEFAULT);
        return Ok(());
    }
    let policy = load(args.config.as_deref())?;
    // Worker uids must be nobody else's (subordinate ranges, passwd, group).
    let range = policy.worker_uids;
    match tapjail_policy::idmap::clashes(&policy.id_files, range, &tapjail_policy::IdFiles::look) {
        Ok(c) if c.is_empty() => {}
        Ok(c) => bail!("{}", tapjail_policy::idmap::describe(&c, range)),
        Err(e) => bail!("cannot check that worker_uids are free: {e}"),
    }
    if args.check {
        println!(
            "{}: ok ({} tenant(s))",
            args.config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "embedded default policy".into()),
            policy.tenants.len()
        );
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!("tap-broker must run as root (it opens images, creates devices and starts workers under their own uids)");
    }
    let tapdisk = tapdisk_path(&policy)?;
    let claim = server::SocketClaim::take(&policy.socket)
        .with_context(|| format!("control socket {}", policy.socket.display()))?;
    // Blocked before any thread starts, so every thread inherits the mask
    // and only the main thread's sigwait takes them.
    let signals = tapjail_common::signals::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
        .context("blocking termination signals")?;

    match host_limits::raise_nofile() {
        Ok(n) => {
            tapjail_common::log_line!("tap-broker: RLIMIT_NOFILE {n} (about {} disks)", n / 10)
        }
        Err(e) => tapjail_common::log_line!("tap-broker: cannot raise RLIMIT_NOFILE: {e}"),
    }
    let devices =
        device::factory::DeviceFactory::new(policy.frontend, &policy.state_dir, Path::new("/dev"))
            .map_err(|e| anyhow::anyhow!("no usable frontend: {e}"))?
            .with_nbd_kernel_connections(policy.nbd_kernel_connections);
    let state = records::StateDir::create(&policy.state_dir)
        .with_context(|| format!("state_dir {}", policy.state_dir.display()))?;
    let audit_ctx = || format!("audit_log {}", policy.audit_log.display());
    if let Some(dir) = policy.audit_log.parent() {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o750)
            .create(dir)
            .with_context(|| format!("{}: creating {}", audit_ctx(), dir.display()))?;
    }
    let audit = AuditLog::open(&policy.audit_log).with_context(audit_ctx)?;
    let exe = std::env::current_exe().context("locating tap-broker's own executable")?;
    // Before any child (the fd holder) exists: tap-broker may move itself
    // into a leaf of its delegated cgroup.
    let cgroups = Arc::new(
        tapjail_broker::cgroup::Cgroups::start(&policy.cgroup)
            .context("cgroups = \"required\" (set cgroups = \"auto\" to run without)")?,
    );
    if let Some(w) = cgroups.warning() {
        tracing::warn!("{w}");
    }
    // Before the fd holder hands back a predecessor's fds: the opener
    // starts with nothing of any disk.
    if let Err(e) = image_open::opener::start(&exe) {
        tracing::warn!("cannot start the image opener ({e}): open helpers fork from tap-broker");
    }
    let (store, held) = match FdStore::open(&policy.state_dir, &exe) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("no fd store ({e}): disks will not survive a restart of tap-broker");
            (FdStore::None, Vec::new())
        }
    };
    let store = Arc::new(store);
    let devices = devices.with_store(store.clone());

    let memlock = memlock_for_workers(policy.worker_memlock);
    let spawn_cfg = broker::SpawnConfig {
        tapdisk,
        memlock,
        timeout: Duration::from_secs(u64::from(policy.worker_timeout_secs)),
        op_timeout: Duration::from_secs(u64::from(policy.operation_timeout_secs)),
        store: Some(store.clone()),
        cgroups: cgroups.clone(),
    };
    let explanation = devices.explanation().to_string();
    let broker = Arc::new(broker::Broker::new(
        policy, audit, devices, state, spawn_cfg,
    )?);
    let sup = Arc::clone(&broker);
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || sup.supervise())?;
    let held_n = held.len();
    let adopted = broker.adopt(&store, held);
    broker.resume_held_merges();
    for note in broker.restore_tenant_limits() {
        tapjail_common::log_line!("tap-broker: {note}");
        broker.notice(Event::BrokerStart, None, None, "restore-limits", note);
    }
    let mut cleanup =
        records::clean_predecessor(&broker.state, &broker.devices, &broker.policy.device_dir);
    // Cgroups of workers that are gone (after adoption took the live ones).
    let (removed, kept) = cgroups.remove_stale();
    cleanup.actions.extend(removed);
    cleanup.problems.extend(kept);
    if let Some(w) = cgroups.warning() {
        broker.notice(Event::BrokerStart, None, None, "cgroups-unavailable", w);
    }
    for a in &cleanup.actions {
        tracing::info!("cleanup: {a}");
        broker.notice(Event::Cleanup, None, None, "restart-cleanup", a.clone());
    }
    for p in &cleanup.problems {
        tracing::warn!("cleanup problem: {p}");
        broker.notice(
            Event::Cleanup,
            None,
            None,
            "restart-cleanup-failed",
            p.clone(),
        );
    }
    if std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() != "1") {
        tracing::warn!(
            "fs.protected_hardlinks is off: a tenant could hard-link files it cannot read into its image root"
        );
    }
    let p = &broker.policy;
    let banner = format!(
        "tap-broker {} serving {} with {explanation}; {} tenant(s); audit {}; state {}; devices {}; workers {} as uids {}..={}; {}; fds kept in the {} ({held_n} handed back: adopted {} minor(s), {} tapdisk(s))",
        env!("CARGO_PKG_VERSION"),
        p.socket.display(),
        p.tenants.len(),
        p.audit_log.display(),
        p.state_dir.display(),
        p.device_dir.display(),
        broker.spawn_cfg.tapdisk.display(),
        p.worker_uids.0,
        p.worker_uids.1,
        cgroups.describe(),
        store.kind(),
        adopted.disks,
        adopted.workers,
    );
    tracing::info!("{banner}");
    broker.notice(Event::BrokerStart, None, None, "start", banner);
    // Disks whose worker died while no broker ran: respawn rules.
    for m in &adopted.dead {
        broker.after_op(*m);
    }
    if args.down {
        tracing::info!("--down: destroying every disk");
        broker.shutdown();
        return Ok(());
    }

    let listener = claim
        .bind()
        .with_context(|| format!("control socket {}", broker.policy.socket.display()))?;
    let srv = Arc::clone(&broker);
    let sock = listener.listener.try_clone()?;
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || server::serve(srv, &sock))?;

    loop {
        match signals.wait().unwrap_or(libc::SIGTERM) {
            // logrotate: reopen the audit log (the policy is not reloaded).
            libc::SIGHUP => {
                tracing::info!("SIGHUP: {}", broker.reopen_audit())
            }
            libc::SIGTERM if matches!(*store, FdStore::None) => {
                tracing::info!(
                    "SIGTERM: no fd store, so no disk could outlive this broker: destroying every disk and stopping"
                );
                broker.shutdown();
                let _ = std::fs::remove_file(&listener.path);
                return Ok(());
            }
            libc::SIGTERM => {
                tracing::info!(
                    "SIGTERM: stopping; every disk stays served for the next tap-broker \
                     (SIGINT or `tap-broker --down` takes them down)"
                );
                broker.leave_for_successor();
                let _ = std::fs::remove_file(&listener.path);
                // Without dropping anything: a dropped device tears itself down.
                std::process::exit(0);
            }
            sig => {
                tracing::info!("signal {sig}: destroying every disk and stopping");
                broker.shutdown();
                let _ = std::fs::remove_file(&listener.path);
                return Ok(());
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tapjail_common::logging::init(tapjail_common::logging::Program::Daemon);
    if args.fd_holder {
        return tapjail_broker::fdstore::holder::main();
    }
    if args.open_helper {
        return image_open::opener_main::main();
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", tapjail_common::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
