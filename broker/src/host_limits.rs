//! Limits that many attached disks meet, raised where the broker may and
//! named when one is the cause of a failure.
//!
//! Each attached disk holds about ten of the broker's fds (the worker's
//! control socket, log pipe and pidfd, the FUSE connection, the loop
//! device, the disk file, two record locks, the fd holder's copies), so
//! the usual soft RLIMIT_NOFILE of 1024 stops near 100 disks. The broker
//! raises its soft limit to the hard one at start (only the hard limit is
//! a decision; the soft one is a default for programs that `select`).

use crate::error::BrokerError;

/// Fds a disk holds in the broker, for the message (measured: ~9-10).
const FDS_PER_DISK: u64 = 10;

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the limit now
/// in force.
pub fn raise_nofile() -> std::io::Result<u64> {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: l.maximum,
        maximum: l.maximum,
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, raised)?;
    Ok(l.maximum.unwrap_or(u64::MAX))
}

/// `e` with the limit named when a host limit caused it: out of fds
/// (EMFILE, ENFILE) or out of tasks for a new worker (EAGAIN on spawn).
pub fn explain(e: BrokerError) -> BrokerError {
    let Some(hint) = hint(&e.message) else {
        return e;
    };
    BrokerError {
        kind: e.kind,
        message: format!("{} ({hint})", e.message),
    }
}

fn hint(message: &str) -> Option<String> {
    if message.contains("(os error 24)") {
        let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let limit = l.current.map_or("unlimited".to_string(), |c| c.to_string());
        return Some(format!(
            "tap-broker has {open} fds open and its RLIMIT_NOFILE is {limit}; each disk holds \
             about {FDS_PER_DISK}: raise LimitNOFILE= in tap-broker.service"
        ));
    }
    if message.contains("(os error 23)") {
        return Some("the host's open-file table is full: raise fs.file-max (sysctl)".to_string());
    }
    if message.contains("cannot start") && message.contains("(os error 11)") {
        return Some(
            "no task could be created for the worker: check kernel.pid_max, \
             kernel.threads-max, TasksMax= of tap-broker.service and the broker's \
             cgroup pids.max (a worker runs about 14 threads)"
                .to_string(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::proto::ErrorKind;

    #[test]
    fn out_of_fds_names_the_limit_and_the_unit_key() {
        let e = explain(BrokerError::new(
            ErrorKind::Failed,
            "control socket: Too many open files (os error 24)",
        ));
        assert!(e.message.contains("RLIMIT_NOFILE is"), "{}", e.message);
        assert!(e.message.contains("LimitNOFILE="), "{}", e.message);
    }

    #[test]
    fn out_of_tasks_on_spawn_names_the_limits() {
        let e = explain(BrokerError::new(
            ErrorKind::Failed,
            "cannot start /usr/sbin/tapdisk: Resource temporarily unavailable (os error 11)",
        ));
        assert!(e.message.contains("kernel.pid_max"), "{}", e.message);
        assert!(e.message.contains("TasksMax="), "{}", e.message);
    }

    #[test]
    fn other_errors_are_left_alone() {
        let e = explain(BrokerError::new(ErrorKind::Failed, "no such image"));
        assert_eq!(e.message, "no such image");
        let e = explain(BrokerError::new(
            ErrorKind::Failed,
            "reading: Resource temporarily unavailable (os error 11)",
        ));
        assert!(
            !e.message.contains("pid_max"),
            "EAGAIN elsewhere is not a task limit"
        );
    }

    #[test]
    fn raising_keeps_the_hard_limit() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        raise_nofile().unwrap();
        let after = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(after.maximum, before.maximum);
        assert_eq!(after.current, before.maximum);
    }
}
