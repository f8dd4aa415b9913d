//! A file secondary on record (`MinorRecord::secondary`), so that a
//! restarted broker that adopts the disk still reopens the secondary when
//! it respawns the disk's tapdisk: the secondary is SM's VDI, the disk of
//! record, and a tapdisk serving the leaf without it would leave the
//! guest's writes out of the VDI. NBD mirrors are not kept (a restarted
//! broker has no connection to give back; as before, their loss shows in
//! `stats`).

use super::{Granted, Mirrors};
use serde::{Deserialize, Serialize};
use tapjail_common::mirror::{MirrorRequest, MirrorTarget};
use tapjail_common::Minor;

/// What reopening a file secondary needs: the request and who opens it.
/// The policy decides it again at that open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub uri: String,
    pub standby: bool,
    pub open_uid: u32,
    pub open_gid: u32,
    pub owners: Vec<u32>,
}

impl FileRecord {
    fn of(g: &Granted) -> Option<FileRecord> {
        let a = g.open_as.as_ref().filter(|_| g.is_file())?;
        Some(FileRecord {
            uri: g.req.uri.clone(),
            standby: g.req.standby,
            open_uid: a.uid,
            open_gid: a.gid,
            owners: a.owners.clone(),
        })
    }

    fn granted(&self) -> Option<Granted> {
        let target = MirrorTarget::parse(&self.uri).ok()?;
        matches!(target, MirrorTarget::File(..)).then(|| Granted {
            req: MirrorRequest {
                uri: self.uri.clone(),
                standby: self.standby,
            },
            target,
            dir: Default::default(),
            owners: self.owners.clone(),
            open_as: Some(tapjail_policy::OpenAs {
                uid: self.open_uid,
                gid: self.open_gid,
                owners: self.owners.clone(),
            }),
        })
    }
}

impl Mirrors {
    /// `minor`'s file secondary, for its record.
    pub fn file_record(&self, minor: Minor) -> Option<FileRecord> {
        FileRecord::of(&self.get(minor)?)
    }

    /// An adopted disk's file secondary, from its record (a record that
    /// does not name a file secondary is ignored).
    pub fn adopt_file(&self, minor: Minor, rec: Option<&FileRecord>) {
        if let Some(g) = rec.and_then(FileRecord::granted) {
            self.set(minor, Some(g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_secondary_round_trips_through_its_record_and_nbd_is_not_kept() {
        let m = Mirrors::default();
        let minor = Minor::new(3).unwrap();
        let rec = FileRecord {
            uri: "vhd:/srv/a/vdi.vhd".into(),
            standby: true,
            open_uid: 7,
            open_gid: 8,
            owners: vec![7, 9],
        };
        m.adopt_file(minor, Some(&rec));
        assert_eq!(m.file_record(minor), Some(rec.clone()));
        let nbd = FileRecord {
            uri: "nbd:/run/x.sock".into(),
            ..rec
        };
        let other = Minor::new(4).unwrap();
        m.adopt_file(other, Some(&nbd));
        assert_eq!(m.file_record(other), None);
    }
}
