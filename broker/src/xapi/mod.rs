//! The tap-ctl flags of XAPI's storage manager (`tapjail_common::xapi`):
//! a `Request::WithOptions` is checked here, its flags are put where the
//! layers below find them ([`scope`]), and the request underneath then runs
//! its ordinary way. `tap-ctl major` is answered here too.
//!
//! - `-t SECS` bounds every answer the worker owes the request; a late
//!   worker is killed (its answer would come after the next question) and
//!   the request fails `TimedOut`; the supervisor then respawns it or marks
//!   the minor dead, as `list` shows.
//! - `-D` and `-e MINOR` become a cache plan the worker gets before `Open`,
//!   remembered per minor so a respawned worker opens the same way.
//! - `-e MINOR` also requires every parent the clone asks for to be the very
//!   file (device and inode) MINOR serves at that depth, MINOR being the
//!   same tenant's (policy) and read-only (here).
//! - `-E` (open and unpause): the key goes into the scope and from there,
//!   in [`keys`], to that minor's worker before `Open` (or `Unpause`,
//!   kept only if the reopen succeeds); kept for respawns.
//! - Flags not built are refused, audited, with `Unsupported`.

pub mod cached_parent;
pub mod keys;
pub mod read_cache;
pub mod read_cache_leaf;
pub mod scope;
pub mod secondary;

use crate::audit::Done;
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::table::Table;
use crate::worker::WorkerConn;
use scope::{Scope, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tapjail_common::proto::{ErrorKind, FrontendKind, Reply, Request};
use tapjail_common::worker_proto::{FromWorker, ToWorker};
use tapjail_common::xapi::{minor_of_device, CachePlan, Options};
use tapjail_common::Minor;
use tapjail_policy::Decision;

type Guard<'a> = MutexGuard<'a, Table>;

/// The cache plan each minor's image was opened with, for respawns.
#[derive(Debug, Default)]
pub struct Plans(Mutex<HashMap<Minor, CachePlan>>, keys::Keys);

impl Plans {
    /// Tell the worker how to open `minor`'s files before `Open`: a fresh
    /// open takes the running request's plan (and remembers it), a respawn
    /// the remembered one. Nothing is sent for the worker's own default.
    pub fn send_plan(
        &self,
        conn: &WorkerConn,
        minor: Minor,
        fresh: bool,
    ) -> Result<(), BrokerError> {
        self.1.send_key(conn, minor, fresh)?;
        let plan = {
            let mut plans = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if fresh {
                let plan = scope::plan();
                if plan == CachePlan::default() {
                    plans.remove(&minor);
                } else {
                    plans.insert(minor, plan);
                }
                plan
            } else {
                plans.get(&minor).copied().unwrap_or_default()
            }
        };
        if plan == CachePlan::default() {
            return Ok(());
        }
        conn.expect(&ToWorker::Cache(plan), &[], &FromWorker::Ok)
            .map_err(BrokerError::from)
    }
}

impl Plans {
    /// Whether `minor`'s image is opened as a read cache (`-r`): a fresh
    /// open asks the running request, a respawn or unpause the plan its
    /// open remembered.
    pub fn read_cache(&self, minor: Minor, fresh: bool) -> bool {
        if fresh {
            return scope::plan().read_cache;
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&minor)
            .is_some_and(|p| p.read_cache)
    }

    /// `minor` was closed: drop its `-E` key.
    pub fn forget(&self, minor: Minor) {
        self.1.forget(minor);
    }

    /// `unpause -E`: see [`keys::Keys::send_for_unpause`].
    pub fn send_unpause_key(
        &self,
        conn: &WorkerConn,
    ) -> Result<Option<tapjail_common::secret::Secret>, BrokerError> {
        self.1.send_for_unpause(conn)
    }

    /// The `unpause -E` reopen succeeded: see [`keys::Keys::keep`].
    pub fn keep_key(&self, minor: Minor, key: tapjail_common::secret::Secret) {
        self.1.keep(minor, key);
    }
}

/// Which verbs each flag belongs to; anything else is a malformed request
/// (tap-ctl never sends it).
fn check_verbs(req: &Request, opts: &Options) -> Result<(), BrokerError> {
    let verb = req.verb();
    let bad = |flag: &str| {
        Err(BrokerError::invalid(format!(
            "{flag} does not apply to {verb}"
        )))
    };
    let open = matches!(req, Request::Open { .. });
    if opts.device.is_some() && !matches!(req, Request::Allocate { minor: None }) {
        return bad("-d DEVPATH");
    }
    if (opts.no_o_direct || opts.existing_parent.is_some()) && !open {
        return bad("-D / -e");
    }
    if opts.read_cache && !open {
        return bad("-r");
    }
    if opts.encryption_key.is_some() && !open && !matches!(req, Request::Unpause { .. }) {
        return bad("-E");
    }
    if opts.timeout_secs.is_some()
        && !matches!(
            req,
            Request::Open { .. }
                | Request::Close { .. }
                | Request::Pause { .. }
                | Request::Unpause { .. }
                | Request::Stats { .. }
        )
    {
        return bad("-t SECS");
    }
    if opts.cbt_log.is_some() && !open && !matches!(req, Request::Unpause { .. }) {
        return bad("-C/-c LOG");
    }
    if let Some(m) = &opts.mirror {
        if !open && !matches!(req, Request::Unpause { .. }) {
            return bad("-2 URI");
        }
        if m.standby && !open {
            return bad("-s");
        }
    }
    if !opts.unbuilt.is_empty() && !open && !matches!(req, Request::Unpause { .. }) {
        return bad(opts.unbuilt[0].flag());
    }
    if matches!(req, Request::WithOptions { .. }) {
        return bad("nested options");
    }
    Ok(())
}

impl Broker {
    /// A request with XAPI's flags: refuse what is not built, set up the
    /// scope, run the request underneath.
    pub fn op_with_options(
        self: &Arc<Self>,
        mut t: Guard<'_>,
        req: &Request,
        opts: &Options,
        d: &Decision,
    ) -> Result<Done, BrokerError> {
        check_verbs(req, opts)?;
        if !opts.unbuilt.is_empty() {
            let names: Vec<String> = opts.unbuilt.iter().map(|u| u.to_string()).collect();
            return Err(BrokerError::new(
                ErrorKind::Unsupported,
                format!(
                    "not supported by tapjail: {}; nothing was changed on minor {}",
                    names.join(", "),
                    minor_named(req).map_or_else(|| "-".into(), |m| m.to_string())
                ),
            ));
        }
        let mut scope = Scope::new(opts.timeout_secs);
        scope.plan.leaf_buffered = opts.no_o_direct;
        scope.plan.read_cache = opts.read_cache;
        scope.key = opts.encryption_key.clone();
        let mut paired = None;
        let leaf_mode = read_cache_leaf::leaf_mode(opts, |m| self.xapi.read_cache(m, false));
        if leaf_mode {
            scope.plan.read_cache = false;
            scope.plan.leaf_fill = true;
        }
        if let Some(from) = opts.existing_parent {
            let from_cache = self.xapi.read_cache(from, false);
            let shared = shared_chain(&t, req, from, from_cache)?;
            if let (true, Some(minor), Some(cache)) =
                (from_cache, minor_named(req), shared.files.first())
            {
                cached_parent::pair(&mut t, minor, from, *cache);
                paired = Some(minor);
            }
            scope.shared = Some(shared);
            scope.plan.parents_buffered = true;
        }
        if let Some(m) = &opts.mirror {
            scope.mirror = Some(self.granted_mirror(m, d)?);
        }
        let _entered = scope.enter();
        let _cbt_log = crate::cbt::enter_log(opts.cbt_log.as_deref());
        match (req, &opts.device) {
            (Request::Allocate { minor: None }, Some(dev)) => {
                let m = minor_of_device(dev, &self.policy.device_dir)
                    .map_err(|e| BrokerError::invalid(e.to_string()))?;
                let tenant = d.tenant.clone().ok_or_else(|| {
                    BrokerError::failed("policy allowed a request without a tenant")
                })?;
                self.op_allocate(t, &tenant, d, Some(m))
            }
            _ => {
                let executed = self.execute(t, req, d);
                if let (Err(_), Some(m)) = (&executed, paired) {
                    cached_parent::unpair(&mut self.table(), m);
                }
                let (reply, mut outcome) = executed?;
                if let (Some(from), Some(_)) = (opts.existing_parent, paired) {
                    outcome.push_str(&format!(
                        "; -e {from}: parent reads go through read cache minor {from} (read-only here)"
                    ));
                }
                // On record what -e shared; an image without a parent
                // shares nothing (blktap ignores -e then too).
                if let (Some(n), Some(from)) = (scope::shared_taken(), opts.existing_parent) {
                    outcome.push_str(&format!("; -e {from}: {n} parent(s) shared"));
                }
                if let Some(done) = scope::mirror_done() {
                    outcome.push_str(&crate::mirror::outcome(&done));
                }
                if leaf_mode {
                    outcome.push_str(read_cache_leaf::OUTCOME);
                } else if opts.read_cache {
                    outcome.push_str(
                        "; -r: served as a read cache of its parent chain (read-only to the guest)",
                    );
                }
                // The audit says a key was given and its size, never more.
                if let Some(k) = &opts.encryption_key {
                    outcome.push_str(&format!("; -E: {}-byte key given to its worker", k.len()));
                }
                Ok((reply, outcome))
            }
        }
    }

    /// The `-2` the policy allowed, with what connecting needs.
    fn granted_mirror(
        &self,
        m: &tapjail_common::mirror::MirrorRequest,
        d: &Decision,
    ) -> Result<crate::mirror::Granted, BrokerError> {
        let target = tapjail_common::mirror::MirrorTarget::parse(&m.uri)
            .map_err(|e| BrokerError::invalid(e.to_string()))?;
        let tenant = d
            .tenant
            .as_deref()
            .and_then(|n| self.policy.tenant(n))
            .ok_or_else(|| BrokerError::failed("policy allowed -2 without a tenant"))?;
        if let tapjail_common::mirror::MirrorTarget::File(..) = &target {
            // Decided again at every open of the file (`secondary`), as
            // the identity the image itself is opened as.
            let open_as = d.image.as_ref().map(|g| g.open_as.clone()).ok_or_else(|| {
                BrokerError::invalid(format!(
                    "-2 {}: a file secondary is given with the image it mirrors (open -a, or \
                     unpause -a)",
                    m.uri
                ))
            })?;
            return Ok(crate::mirror::Granted {
                req: m.clone(),
                target,
                dir: Default::default(),
                owners: tenant.uids.clone(),
                open_as: Some(open_as),
            });
        }
        let dir = tenant.mirror.grant(&target).ok_or_else(|| {
            BrokerError::failed(format!("policy allowed -2 {} without a grant", m.uri))
        })?;
        Ok(crate::mirror::Granted {
            req: m.clone(),
            target,
            dir,
            owners: tenant.uids.clone(),
            open_as: None,
        })
    }

    /// `tap-ctl major`: the block major of the devices this broker's
    /// frontend creates, from `/proc/devices` as blktap reads it.
    pub fn op_major(&self, t: Guard<'_>) -> Result<Done, BrokerError> {
        drop(t);
        let kind = self.devices.kind();
        let name = match kind {
            // Our disks are loop devices over the FUSE file.
            FrontendKind::Fuse => "loop",
            // ublk disks get extended (dynamic) device numbers.
            FrontendKind::Ublk => "blkext",
            // The kernel's own nbd devices.
            FrontendKind::NbdKernel => "nbd",
            FrontendKind::Nbd => {
                return Err(BrokerError::new(
                    ErrorKind::Unsupported,
                    "major: this tap-broker's frontend is nbd, which creates no block device on this host \
                     (clients attach the export themselves): there is no major to report",
                ))
            }
        };
        let devices = std::fs::read_to_string("/proc/devices")
            .map_err(|e| BrokerError::failed(format!("major: reading /proc/devices: {e}")))?;
        let major = block_major(&devices, name).ok_or_else(|| {
            BrokerError::failed(format!(
                "major: /proc/devices lists no block device {name:?} (frontend {})",
                kind.as_str()
            ))
        })?;
        Ok((Reply::Major { major }, format!("{name} {major}")))
    }
}

/// The minor a request names, for messages.
fn minor_named(req: &Request) -> Option<Minor> {
    match req {
        Request::Open { minor, .. } | Request::Unpause { minor, .. } => Some(*minor),
        _ => None,
    }
}

/// The chain `-e from` shares: `from` must serve (or hold paused) a
/// read-only image, and not be the minor being opened.
fn shared_chain(
    t: &Table,
    req: &Request,
    from: Minor,
    from_cache: bool,
) -> Result<Shared, BrokerError> {
    if minor_named(req) == Some(from) {
        return Err(BrokerError::invalid(format!(
            "-e {from}: a minor cannot share its own parent chain"
        )));
    }
    let disk = t.disk(from).map_err(|e| e.context(format!("-e {from}")))?;
    let phase = disk.phase()?;
    let Some(image) = phase.image() else {
        return Err(BrokerError::busy(format!(
            "-e {from}: minor {from} has no image open to share"
        )));
    };
    // A read cache's own file is written by its fills, never by a guest:
    // a clone reads it as its parent (see [`cached_parent`]).
    let skip = usize::from(from_cache);
    if image.files.iter().skip(skip).any(|(_, rw)| *rw) {
        return Err(BrokerError::busy(format!(
            "-e {from}: minor {from} serves {} writable; a shared parent chain must be opened read-only (-R)",
            image.spec
        )));
    }
    Ok(Shared {
        from,
        files: image.files.iter().map(|(id, _)| *id).collect(),
        taken: Default::default(),
    })
}

/// blktap's `sscanf(line, "%d NAME")` over the "Block devices:" part.
fn block_major(proc_devices: &str, name: &str) -> Option<u32> {
    let block = proc_devices.split("Block devices:").nth(1)?;
    block.lines().find_map(|l| {
        let (num, n) = l.trim().split_once(' ')?;
        (n.trim() == name).then(|| num.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_major_reads_the_block_section_only() {
        let p = "Character devices:\n  7 vcs\n 10 misc\n\nBlock devices:\n  7 loop\n  8 sd\n259 blkext\n";
        assert_eq!(block_major(p, "loop"), Some(7));
        assert_eq!(block_major(p, "blkext"), Some(259));
        assert_eq!(block_major(p, "vcs"), None, "a char device is no answer");
        assert_eq!(block_major(p, "tapdev"), None);
    }

    #[test]
    fn flags_outside_their_verbs_are_invalid() {
        let m = Minor::new(1).unwrap();
        let close = Request::Close {
            pid: None,
            minor: m,
            force: false,
        };
        let o = |f: fn(&mut Options)| {
            let mut o = Options::default();
            f(&mut o);
            o
        };
        assert!(check_verbs(&close, &o(|o| o.timeout_secs = Some(120))).is_ok());
        assert!(check_verbs(&close, &o(|o| o.no_o_direct = true)).is_err());
        assert!(check_verbs(
            &close,
            &o(|o| o.device = Some("/dev/tapjail/tapdev1".into()))
        )
        .is_err());
        assert!(check_verbs(&Request::Spawn, &o(|o| o.timeout_secs = Some(1))).is_err());
        fn mirror(o: &mut Options, standby: bool) {
            o.mirror = Some(tapjail_common::mirror::MirrorRequest {
                uri: "nbd:/run/m.sock".into(),
                standby,
            });
        }
        assert!(check_verbs(&close, &o(|o| mirror(o, false))).is_err());
        let unpause = Request::Unpause {
            pid: None,
            minor: m,
            image: None,
        };
        assert!(check_verbs(&unpause, &o(|o| mirror(o, false))).is_ok());
        assert!(
            check_verbs(&unpause, &o(|o| mirror(o, true))).is_err(),
            "-s belongs to open"
        );
        assert!(check_verbs(
            &Request::Unpause {
                pid: None,
                minor: m,
                image: None
            },
            &o(|o| o.cbt_log = Some("/x.log".into()))
        )
        .is_ok());
        let key = |o: &mut Options| {
            o.encryption_key = Some(tapjail_common::secret::Secret::new(vec![1; 32]))
        };
        assert!(check_verbs(&unpause, &o(key)).is_ok(), "unpause -E");
        assert!(
            check_verbs(&close, &o(key)).is_err(),
            "-E belongs to open and unpause"
        );
    }
}
