//! Adopting one minor: its device rebuilt from the kept fds, and the
//! image its worker must report open and served.

use super::*;

impl Broker {
    /// Adopt one minor; `Ok(true)` when its worker is gone (respawn rules).
    pub(super) fn adopt_minor(
        self: &Arc<Self>,
        minor: Minor,
        rec: &MinorRecord,
        lock: LockFile,
        fds: &mut KeptFds,
        live: &BTreeMap<u32, Live>,
        gone: &mut BTreeMap<u32, (WorkerRecord, LockFile)>,
    ) -> Result<bool, String> {
        let bits = State(rec.state);
        let (paused, closed) = (bits.contains(State::PAUSED), bits.contains(State::CLOSED));
        let served = match &rec.served {
            None => None,
            Some(sr) => {
                let mut device = self
                    .devices
                    .adopt(minor, &sr.device, fds)
                    .map_err(|e| format!("its device: {e}"))?;
                device.adopted(rec.worker.filter(|p| live.contains_key(p)));
                // The link must still name the device (a tenant cannot
                // write device_dir, but check rather than trust).
                let link = match rec
                    .link
                    .as_ref()
                    .filter(|l| std::fs::read_link(l).is_ok_and(|t| t == sr.device.node))
                {
                    Some(l) => l.clone(),
                    None => self
                        .publish(minor, &sr.device.node)
                        .map_err(|e| format!("publishing its device: {}", e.message))?,
                };
                Some(Served {
                    image: open_image(sr),
                    device,
                    link,
                })
            }
        };
        // A worker that disagrees with the record is killed once the minor
        // is in the table (see `kill_adopted`), not before.
        let mut kill: Option<(u32, String)> = None;
        if let (Some(pid), Some(s), Some(l)) =
            (rec.worker, &served, rec.worker.and_then(|p| live.get(&p)))
        {
            let has = &l.has;
            let want = format!("{}:{}", s.image.spec.kind, s.image.grant.path.display());
            let agrees = if paused {
                has.image.is_some() && has.paused
            } else {
                has.image.as_deref() == Some(want.as_str()) && has.serving && !has.paused
            };
            if !agrees {
                // The supervisor sees it exit and the respawn rules apply,
                // as for any worker that dies.
                kill = Some((
                    pid,
                    format!(
                        "it reports {:?} (serving {}, paused {}), the record says {want}",
                        has.image, has.serving, has.paused
                    ),
                ));
            }
        }
        // Attached without an image on record: a worker that has one open
        // (a crash between its open and the broker's record of it) is in
        // a state nobody recorded.
        if let (Some(pid), None) = (rec.worker, &served) {
            if let Some(l) = live.get(&pid).filter(|l| l.has.image.is_some()) {
                kill = Some((
                    pid,
                    format!(
                        "it reports {:?} open, the record says no image",
                        l.has.image
                    ),
                ));
            }
        }
        let files = served
            .as_ref()
            .map(|s| s.image.files.clone())
            .unwrap_or_default();
        let image = served.as_ref().map(|s| s.image.spec.to_string());
        let alive = rec.worker.filter(|p| live.contains_key(p));
        let phase = match (rec.worker, alive, served) {
            (None, _, None) => Phase::Allocated,
            (None, _, Some(_)) => {
                return Err("its record has an image but no worker".into());
            }
            (Some(w), Some(_), None) => Phase::Attached { worker: w, closed },
            (Some(w), Some(_), Some(served)) if paused => Phase::Paused { worker: w, served },
            (Some(w), Some(_), Some(served)) => Phase::Serving { worker: w, served },
            (Some(w), None, served) => Phase::Dead {
                worker: w,
                served,
                paused,
                closed,
            },
        };
        let mut dead = phase.wants_respawn() || matches!(phase, Phase::Dead { .. });
        let mut disk = Disk::new(minor, rec.owner.clone(), lock);
        disk.restarts = rec.restarts;
        disk.io = rec.io;
        disk.secondary = rec.secondary.clone();
        self.mirrors.adopt_file(minor, rec.secondary.as_ref());
        disk.cache = rec.cache;
        self.xapi.adopt_plan(minor, rec.cache.as_ref());
        if dead {
            disk.deaths.push_back(Instant::now());
        }
        if let Ok(p) = disk.phase_mut() {
            *p = phase;
        }
        disk.persist();
        let owner = rec.owner.clone();
        let mut t = self.table();
        if let Err(e) = t.claim_files(minor, &files) {
            // Another adopted minor claims the same file for writing: the
            // records disagree with each other; take this one down.
            drop(t);
            disk.release();
            return Err(format!("its image files: {}", e.message));
        }
        // Adopted alive, but it died since and the supervisor, finding no
        // minor of it, forgot it as unattached: dead, as if it died now.
        if alive.is_some_and(|p| !t.workers.contains_key(&p)) {
            if let Ok(p) = disk.phase_mut() {
                let was = std::mem::replace(p, Phase::Allocated);
                *p = was.into_dead();
            }
            disk.deaths.push_back(Instant::now());
            disk.persist();
            dead = true;
        }
        if let Some(pid) = rec.worker {
            match t.workers.get_mut(&pid) {
                Some(w) => w.minor = Some(minor),
                None => {
                    // Gone while no broker ran: an exited entry, as the
                    // supervisor leaves a worker that died, so `list`,
                    // `destroy` and respawn treat it as any dead worker.
                    if let Some(w) = exited_worker(pid, minor, &owner, gone) {
                        t.workers.insert(pid, w);
                    }
                }
            }
        }
        t.disks.insert(minor, disk);
        drop(t);
        if let Some((pid, why)) = kill {
            self.kill_adopted(pid, &why);
        }
        self.adopt_notice(
            "adopt-minor",
            Some(owner),
            None,
            format!(
                "adopted minor {minor}{}{}",
                image.map(|i| format!(" serving {i}")).unwrap_or_default(),
                match (rec.worker, dead) {
                    (Some(p), false) => format!(" with tapdisk {p}"),
                    (Some(p), true) => format!("; its tapdisk {p} is gone: respawn rules apply"),
                    (None, _) => String::new(),
                }
            ),
        );
        Ok(dead)
    }
}

/// A table entry for worker `pid`, which is gone: its record and lock (kept
/// from the refusal), a pidfd of a process that has already been reaped
/// (so nothing can ever be signalled through it) and a control socket
/// whose other end is closed.
fn exited_worker(
    pid: u32,
    minor: Minor,
    owner: &str,
    gone: &mut BTreeMap<u32, (WorkerRecord, LockFile)>,
) -> Option<Worker> {
    let (rec, record) = gone.remove(&pid)?;
    let pidfd = Arc::new(sys::reaped_pidfd().ok()?);
    let (ours, _theirs) = UnixStream::pair().ok()?;
    let conn = WorkerConn::new(ours, pid, std::time::Duration::from_secs(1)).ok()?;
    Some(Worker {
        pid,
        owner: owner.to_string(),
        uid: rec.uid,
        pidfd,
        killed: conn.kill_note(),
        conn: Arc::new(Mutex::new(conn)),
        minor: Some(minor),
        exit: Some(sys::Exit::Unknown),
        stopping: false,
        record,
        start_time: rec.start_time,
        kept: None,
        cgroup: None,
    })
}

fn open_image(sr: &ServedRecord) -> OpenImage {
    OpenImage {
        spec: ImageSpec {
            kind: sr.kind,
            path: sr.path.display().to_string(),
        },
        grant: ImageGrant {
            path: sr.path.clone(),
            root: sr.root.clone(),
            relative: sr.relative.clone(),
            read_only: sr.grant_read_only,
            open_as: tapjail_policy::OpenAs {
                uid: sr.open_uid,
                gid: sr.open_gid,
                owners: sr.owners.clone(),
            },
            shared: sr.shared,
        },
        read_only: sr.read_only,
        size: sr.size,
        chain: sr.chain.clone(),
        files: sr.files.clone(),
    }
}
