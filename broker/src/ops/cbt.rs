//! `tap-ctl cbt start|checkpoint|stop|list`: a minor's bitmaps, kept by
//! its worker in log files next to the leaf image (see `crate::cbt`).

use super::{live_worker, no_image};
use crate::audit::Done;
use crate::broker::Broker;
use crate::cbt::{named_file, Owner};
use crate::error::BrokerError;
use crate::lease::Lease;
use crate::table::Table;
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use tapjail_common::cbt::{valid_name, CbtInfo, CbtOp, CbtRequest, ToWorkerCbt};
use tapjail_common::proto::Reply;
use tapjail_common::worker_proto::{FromWorker, ToWorker};

impl Broker {
    pub fn op_cbt(
        self: &Arc<Self>,
        t: MutexGuard<'_, Table>,
        req: &CbtRequest,
    ) -> Result<Done, BrokerError> {
        let minor = req.minor;
        let name = match (req.op, &req.name) {
            (CbtOp::List, _) => String::new(),
            (_, Some(n)) if valid_name(n) => n.clone(),
            (op, Some(n)) => {
                return Err(BrokerError::invalid(format!(
                    "cbt {}: bitmap name {n:?} must be 1-64 characters of A-Z a-z 0-9 _ . - \
                     (not starting with a dot)",
                    op.as_str()
                )))
            }
            (op, None) => {
                return Err(BrokerError::invalid(format!(
                    "cbt {} needs --name NAME",
                    op.as_str()
                )))
            }
        };
        let w = live_worker(&t, minor, None)?;
        let disk = t.disk(minor)?;
        let owner = disk.owner.clone();
        let image = disk
            .phase()?
            .image()
            .cloned()
            .ok_or_else(|| no_image(minor))?;
        let lease = Lease::take(&self.table, t, minor, "cbt", |_, _| Ok(()))?;
        let result = {
            let conn = w.conn.lock().unwrap_or_else(|e| e.into_inner());
            let call = |msg| -> Result<Vec<CbtInfo>, BrokerError> {
                match conn.call(&ToWorker::Cbt(msg), &[])? {
                    FromWorker::Cbt(maps) => Ok(crate::cbt::clean(maps)),
                    _ => Err(BrokerError::failed(
                        "the worker answered Cbt with something else",
                    )),
                }
            };
            match req.op {
                CbtOp::List => call(ToWorkerCbt::List),
                CbtOp::Checkpoint => call(ToWorkerCbt::Checkpoint { name: name.clone() }),
                CbtOp::Stop => call(ToWorkerCbt::Stop { name: name.clone() }).and_then(|maps| {
                    let mut files = self.cbt_files(minor);
                    files.retain(|f| f.name != name);
                    self.save_cbt_files(minor, &files)?;
                    Ok(maps)
                }),
                CbtOp::Start => {
                    let mut files = self.cbt_files(minor);
                    if files.iter().any(|f| f.name == name) {
                        Err(BrokerError::busy(format!(
                            "cbt start: minor {minor} tracks a bitmap named {name:?} already"
                        )))
                    } else {
                        let file = named_file(&PathBuf::from(&image.spec.path), &name);
                        let who = Owner {
                            minor,
                            tenant: &owner,
                            open_as: &image.grant.open_as,
                        };
                        self.cbt_attach(who, &conn, &file, true).and_then(|maps| {
                            files.push(file);
                            self.save_cbt_files(minor, &files)?;
                            Ok(maps)
                        })
                    }
                }
            }
        };
        drop(lease);
        self.after_op(minor);
        let maps = result?;
        let outcome = match req.op {
            CbtOp::List => format!("{} bitmap(s) on minor {minor}", maps.len()),
            op => format!("cbt {} {name} on minor {minor}", op.as_str()),
        };
        Ok((Reply::Cbt(maps), outcome))
    }
}
