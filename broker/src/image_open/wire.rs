//! A [`Plan`] as bytes, for the one hop from the broker to its opener
//! process ([`super::opener`]). Both ends are tap-broker, but the decoder
//! still checks every length: a malformed request is refused, never
//! half-understood.

use super::helper::{Action, Plan};
use super::locks::{LockPlan, PLANS};
use std::ffi::CString;

/// Format version, first byte of every request.
const VERSION: u8 = 1;
/// Longest request: four paths of at most `PATH_MAX` and the owner list.
pub const MAX_REQUEST: usize = 4 * (4 + 4096) + 32 + 4 * MAX_OWNERS;
/// Most owner uids a request carries (a tenant lists a few).
const MAX_OWNERS: usize = 1024;
const HEAD: usize = 32;

/// Why a request cannot be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("image-open request too large")]
    TooLarge,
    #[error("malformed image-open request")]
    Malformed,
}

const A_OPEN: u8 = 0;
const A_CREATE: u8 = 1;
const A_OPEN_OR_CREATE: u8 = 2;
const A_REMOVE: u8 = 3;

/// `plan` as one request.
pub fn encode(plan: &Plan<'_>) -> Result<Vec<u8>, WireError> {
    let (action, dir, base, id) = match plan.action {
        Action::Open => (A_OPEN, c"", c"", (0, 0)),
        Action::Create => (A_CREATE, c"", c"", (0, 0)),
        Action::OpenOrCreate => (A_OPEN_OR_CREATE, c"", c"", (0, 0)),
        Action::Remove { dir, base, id } => (A_REMOVE, dir, base, id),
    };
    let lock = plan.lock.index().ok_or(WireError::Malformed)?;
    if plan.owners.len() > MAX_OWNERS {
        return Err(WireError::TooLarge);
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[VERSION, action, u8::from(plan.writable), lock]);
    out.extend_from_slice(&plan.uid.to_le_bytes());
    out.extend_from_slice(&plan.gid.to_le_bytes());
    let owners = u32::try_from(plan.owners.len()).map_err(|_| WireError::TooLarge)?;
    out.extend_from_slice(&owners.to_le_bytes());
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&id.1.to_le_bytes());
    for o in plan.owners {
        out.extend_from_slice(&o.to_le_bytes());
    }
    for s in [plan.root, plan.relative, dir, base] {
        let b = s.to_bytes();
        if b.len() > 4096 {
            return Err(WireError::TooLarge);
        }
        let len = u32::try_from(b.len()).map_err(|_| WireError::TooLarge)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// A decoded request: owns what a [`Plan`] borrows.
#[derive(Debug)]
pub struct Request {
    action: u8,
    writable: bool,
    lock: LockPlan,
    uid: u32,
    gid: u32,
    id: (u64, u64),
    owners: Vec<u32>,
    root: CString,
    relative: CString,
    dir: CString,
    base: CString,
}

impl Request {
    /// The plan this request carries.
    pub fn plan(&self) -> Plan<'_> {
        let action = match self.action {
            A_CREATE => Action::Create,
            A_OPEN_OR_CREATE => Action::OpenOrCreate,
            A_REMOVE => Action::Remove {
                dir: &self.dir,
                base: &self.base,
                id: self.id,
            },
            _ => Action::Open,
        };
        Plan {
            root: &self.root,
            relative: &self.relative,
            writable: self.writable,
            uid: self.uid,
            gid: self.gid,
            owners: &self.owners,
            lock: self.lock,
            action,
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let lo = u64::from(self.u32()?);
        let hi = u64::from(self.u32()?);
        Ok(lo | hi << 32)
    }
    fn cstring(&mut self) -> Result<CString, WireError> {
        let len = usize::try_from(self.u32()?).map_err(|_| WireError::Malformed)?;
        if len > 4096 {
            return Err(WireError::Malformed);
        }
        CString::new(self.take(len)?).map_err(|_| WireError::Malformed)
    }
}

/// The request in `bytes`, checked.
pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
    if bytes.len() > MAX_REQUEST || bytes.len() < HEAD {
        return Err(WireError::Malformed);
    }
    let mut r = Reader(bytes);
    let head = r.take(4)?;
    let (version, action, writable, lock) = (head[0], head[1], head[2], head[3]);
    if version != VERSION || action > A_REMOVE || writable > 1 {
        return Err(WireError::Malformed);
    }
    let lock = *PLANS.get(usize::from(lock)).ok_or(WireError::Malformed)?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let n = usize::try_from(r.u32()?).map_err(|_| WireError::Malformed)?;
    let id = (r.u64()?, r.u64()?);
    if n > MAX_OWNERS {
        return Err(WireError::Malformed);
    }
    let owners = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
    let req = Request {
        action,
        writable: writable == 1,
        lock,
        uid,
        gid,
        id,
        owners,
        root: r.cstring()?,
        relative: r.cstring()?,
        dir: r.cstring()?,
        base: r.cstring()?,
    };
    if !r.0.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_open::locks;

    #[test]
    fn wire_plan_round_trips_every_action_and_lock() {
        let owners = [1000, 1001];
        for (lock, action) in [
            (locks::WRITER, Action::Open),
            (locks::READER, Action::Create),
            (locks::PARENT_BECOMING_LEAF, Action::OpenOrCreate),
            (
                locks::NONE,
                Action::Remove {
                    dir: c"sub",
                    base: c"x.vhd",
                    id: (7, u64::MAX),
                },
            ),
        ] {
            let plan = Plan {
                root: c"/srv/images",
                relative: c"sub/x.vhd",
                writable: true,
                uid: 1000,
                gid: 100,
                owners: &owners,
                lock,
                action,
            };
            let req = decode(&encode(&plan).unwrap()).unwrap();
            let back = req.plan();
            assert!(back.root == plan.root && back.relative == plan.relative);
            assert_eq!((back.uid, back.gid, back.writable), (1000, 100, true));
            assert_eq!(back.owners, &owners);
            assert_eq!(back.lock.index(), lock.index());
            assert_eq!(format!("{:?}", back.action), format!("{action:?}"));
        }
    }

    #[test]
    fn wire_malformed_requests_are_refused() {
        let plan = Plan {
            root: c"/r",
            relative: c"a",
            writable: false,
            uid: 1,
            gid: 1,
            owners: &[],
            lock: locks::READER,
            action: Action::Open,
        };
        let good = encode(&plan).unwrap();
        // Every truncation, a trailing byte, a bad version, action, flag
        // or lock index: refused.
        for n in 0..good.len() {
            assert_eq!(decode(&good[..n]).unwrap_err(), WireError::Malformed, "{n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        for (at, v) in [(0, 2u8), (1, 9), (2, 2), (3, 200)] {
            let mut bad = good.clone();
            bad[at] = v;
            assert!(decode(&bad).is_err(), "byte {at} = {v}");
        }
        // A length that runs past the end, and a NUL inside a path.
        let mut bad = good.clone();
        bad[HEAD] = 0xff;
        assert!(decode(&bad).is_err());
        let mut nul = good;
        let n = nul.len();
        nul[n - 4] = 1;
        nul.push(0);
        assert!(decode(&nul).is_err());
    }
}
