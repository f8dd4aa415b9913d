//! Adopting one worker: its pidfd first, then `/proc` (start time, uid,
//! confinement), its kept control socket and stderr pipe, and its answer
//! to `Resync`.

use super::*;

/// An adopted worker's pidfd, connection, kept fds and answer to Resync.
type Checked = (
    Arc<OwnedFd>,
    WorkerConn,
    Option<Kept>,
    crate::resync::WorkerHas,
);

impl Broker {
    pub(super) fn adopt_worker(
        &self,
        rec: &WorkerRecord,
        mut lock: LockFile,
        store: &Arc<FdStore>,
        held: &mut BTreeMap<String, OwnedFd>,
    ) -> Result<(Worker, crate::resync::WorkerHas), (String, LockFile)> {
        match self.check_worker(rec, &mut lock, store, held) {
            Ok((pidfd, conn, kept, has)) => Ok((
                Worker {
                    pid: rec.pid,
                    owner: rec.owner.clone(),
                    uid: rec.uid,
                    pidfd,
                    killed: conn.kill_note(),
                    conn: Arc::new(Mutex::new(conn)),
                    minor: None,
                    exit: None,
                    stopping: false,
                    record: lock,
                    start_time: rec.start_time,
                    kept,
                    cgroup: self.spawn_cfg.cgroups.adopt(rec.pid),
                },
                has,
            )),
            Err(why) => Err((why, lock)),
        }
    }

    pub(super) fn check_worker(
        &self,
        rec: &WorkerRecord,
        lock: &mut LockFile,
        store: &Arc<FdStore>,
        held: &mut BTreeMap<String, OwnedFd>,
    ) -> Result<Checked, String> {
        let pid = rec.pid;
        let [ctl_name, log_name] = kept_names(pid);
        let ctl = held.remove(&ctl_name);
        let log = held.remove(&log_name);
        let drop_kept = || {
            let _ = store.remove(&ctl_name);
            let _ = store.remove(&log_name);
        };
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                drop_kept();
                return Err(format!("no longer running ({e})"));
            }
        };
        if sys::pidfd_exited(pidfd.as_fd(), 0).unwrap_or(false) {
            drop_kept();
            return Err("no longer running (exited, not yet reaped by its new parent)".into());
        }
        // After the pidfd: if these match now, the pidfd is that process.
        let info = sys::proc_info(pid).map_err(|e| format!("reading /proc/{pid}: {e}"));
        let checked = info.and_then(|info| {
            if info.start_time != rec.start_time || info.uids[0] != rec.uid {
                return Err(format!(
                    "pid {pid} is now another process (start time {} uid {}, recorded {} and {})",
                    info.start_time, info.uids[0], rec.start_time, rec.uid
                ));
            }
            Ok(info)
        });
        let info = match checked {
            Ok(i) => i,
            Err(e) => {
                drop_kept();
                return Err(e);
            }
        };
        // From here on it is our predecessor's worker: whatever fails
        // kills it (clean_predecessor would too).
        let fail = |why: String| {
            drop_kept();
            let _ = sys::pidfd_kill(pidfd.as_fd());
            let _ = sys::pidfd_exited(pidfd.as_fd(), 5000);
            why
        };
        if let Some(what) = confinement_problem(&info, rec.uid) {
            return Err(fail(format!("not confined: {what}")));
        }
        let (Some(ctl), Some(log)) = (ctl, log) else {
            return Err(fail(
                "its control socket or stderr pipe was not kept while no broker ran".into(),
            ));
        };
        let ctl = UnixStream::from(ctl);
        let has = crate::resync::resync(&ctl, self.spawn_cfg.timeout)
            .map_err(|e| fail(format!("control socket: {e}")))?;
        let kept_fds = (ctl.try_clone(), log.try_clone());
        let kept = match (&kept_fds, &self.spawn_cfg.store) {
            (&(Ok(ref c), Ok(ref l)), Some(s)) => Kept::put(
                s,
                &[(ctl_name.clone(), c.as_fd()), (log_name.clone(), l.as_fd())],
            )
            .map_err(|e| tracing::warn!(pid, "tapdisk {pid}: keeping its fds: {e}"))
            .ok(),
            _ => None,
        };
        drop(kept_fds);
        crate::worker_log::forward(std::io::PipeReader::from(log), pid);
        let mut conn = WorkerConn::new(ctl, pid, self.spawn_cfg.timeout)
            .map_err(|e| fail(format!("control socket: {e}")))?
            .with_op_timeout(self.spawn_cfg.op_timeout);
        conn.set_pidfd(pidfd.clone());
        let _ = lock.write(rec);
        Ok((pidfd, conn, kept, has))
    }
}
