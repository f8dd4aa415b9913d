//! Worker uids must belong to nobody else. A worker runs as a uid (and an
//! equal gid) from `worker_uids`; whoever else owns one of those ids can
//! signal, ptrace or starve the workers. `useradd` hands every new user
//! 65536 subordinate uids and gids (`/etc/subuid`, `/etc/subgid`, from
//! SUB_UID_MIN 100000 up to SUB_UID_MAX 600100000), which a user maps into
//! a user namespace of her own; the old default range 300000..=300999
//! fell inside the 4th user's range. So the broker and `tap-ctl policy
//! check` refuse a range that meets any subordinate range or any passwd
//! or group entry, naming the file, the line and the owner.
//!
//! Parsing only: the caller reads the files ([`IdFiles::look`] on this
//! host, anything in tests).

use std::fmt;
use std::path::{Path, PathBuf};

/// The files that say who owns which ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdFiles {
    pub subuid: PathBuf,
    pub subgid: PathBuf,
    pub passwd: PathBuf,
    pub group: PathBuf,
}

impl Default for IdFiles {
    fn default() -> Self {
        IdFiles {
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
        }
    }
}

/// Longest id file read (a site with 100 000 users has a passwd file of a
/// few MiB).
pub const MAX_ID_FILE: u64 = 64 * 1024 * 1024;

impl IdFiles {
    /// Read `path` on this host: a missing file is empty (no subuid file
    /// means no subordinate ranges); anything else that fails is an error
    /// to report. With [`crate::RootProbe::look`], the only place this
    /// crate touches the filesystem.
    pub fn look(path: &Path) -> Result<String, String> {
        match tapjail_common::adminfile::read_text(path, MAX_ID_FILE) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// One id range of someone else's that meets the worker range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdClash {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub owner: String,
    /// What the entry gives its owner: "subordinate uids", "uid", ...
    pub what: &'static str,
    pub first: u64,
    pub last: u64,
}

impl fmt::Display for IdClash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = if self.first == self.last {
            format!("{}", self.first)
        } else {
            format!("{}..={}", self.first, self.last)
        };
        write!(
            f,
            "{}:{}: {} {ids} of {:?} overlap worker_uids",
            self.file.display(),
            self.line,
            self.what,
            self.owner
        )
    }
}

/// Entries of `text` (a subuid/subgid file: `owner:first:count`) that
/// meet `range`. Malformed lines are skipped (the shadow tools skip
/// them too).
pub fn subid_clashes(
    text: &str,
    file: &Path,
    what: &'static str,
    range: (u32, u32),
) -> Vec<IdClash> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut f = line.trim().split(':');
        let (Some(owner), Some(first), Some(count)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(first), Ok(count)) = (first.trim().parse::<u64>(), count.trim().parse::<u64>())
        else {
            continue;
        };
        if count == 0 || owner.starts_with('#') {
            continue;
        }
        let last = first.saturating_add(count - 1);
        if first <= u64::from(range.1) && last >= u64::from(range.0) {
            out.push(IdClash {
                file: file.to_path_buf(),
                line: i + 1,
                owner: owner.to_string(),
                what,
                first,
                last,
            });
        }
    }
    out
}

/// Entries of `text` (passwd or group format: `name:x:ID:...`) whose id
/// in field `field` (0-based) lies in `range`.
pub fn db_clashes(
    text: &str,
    file: &Path,
    field: usize,
    what: &'static str,
    range: (u32, u32),
) -> Vec<IdClash> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(name), Some(Ok(id))) = (
            fields.first(),
            fields.get(field).map(|v| v.trim().parse::<u64>()),
        ) else {
            continue;
        };
        if (u64::from(range.0)..=u64::from(range.1)).contains(&id) {
            out.push(IdClash {
                file: file.to_path_buf(),
                line: i + 1,
                owner: (*name).to_string(),
                what,
                first: id,
                last: id,
            });
        }
    }
    out
}

/// Every clash of `range` with the ids the four files hand out; `read`
/// supplies each file's text. A file that cannot be read is an error:
/// the range cannot be shown to be free.
pub fn clashes(
    files: &IdFiles,
    range: (u32, u32),
    read: &dyn Fn(&Path) -> Result<String, String>,
) -> Result<Vec<IdClash>, String> {
    let mut out = Vec::new();
    out.extend(subid_clashes(
        &read(&files.subuid)?,
        &files.subuid,
        "subordinate uids",
        range,
    ));
    out.extend(subid_clashes(
        &read(&files.subgid)?,
        &files.subgid,
        "subordinate gids",
        range,
    ));
    let passwd = read(&files.passwd)?;
    out.extend(db_clashes(&passwd, &files.passwd, 2, "uid", range));
    out.extend(db_clashes(&passwd, &files.passwd, 3, "primary gid", range));
    out.extend(db_clashes(
        &read(&files.group)?,
        &files.group,
        2,
        "gid",
        range,
    ));
    Ok(out)
}

/// The refusal, in words, for `tap-broker` and `tap-ctl policy check`.
pub fn describe(clashes: &[IdClash], range: (u32, u32)) -> String {
    let mut s = format!(
        "worker_uids {}..={} are not free: workers must run as ids nobody else owns \
         (the owner of a subordinate range can signal, ptrace or starve workers from a user namespace):",
        range.0, range.1
    );
    for c in clashes {
        s.push_str(&format!("\n  {c}"));
    }
    s.push_str(&format!(
        "\nmove worker_uids to ids nobody is given (the default, {}..={}, lies above useradd's and systemd's ranges)",
        crate::config::defaults::WORKER_UIDS.0,
        crate::config::defaults::WORKER_UIDS.1
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::defaults::WORKER_UIDS;

    /// What `useradd` writes for its first four users with the default
    /// login.defs (SUB_UID_MIN 100000, SUB_UID_COUNT 65536).
    const USERADD_SUBUID: &str =
        "alice:100000:65536\nbob:165536:65536\ncarol:231072:65536\ndave:296608:65536\n";

    #[test]
    fn idmap_old_default_range_meets_the_fourth_users_subuids() {
        let c = subid_clashes(
            USERADD_SUBUID,
            Path::new("/etc/subuid"),
            "subordinate uids",
            (300_000, 300_999),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].to_string(),
            "/etc/subuid:4: subordinate uids 296608..=362143 of \"dave\" overlap worker_uids"
        );
    }

    #[test]
    fn idmap_default_range_is_above_every_allocator() {
        // useradd's whole subordinate space, systemd's dynamic users and
        // nspawn's container ranges, LXD/Incus's default map.
        let everyone = "max:100000:600000001\nnspawn:524288:1878523904\nlxd:1000000:1000000000\n";
        assert!(
            subid_clashes(everyone, Path::new("s"), "subordinate uids", WORKER_UIDS).is_empty()
        );
        assert!(WORKER_UIDS.0 > 1_879_048_191 && WORKER_UIDS.1 < 2_147_352_576);
        assert!(
            subid_clashes(
                "x:2000000500:1\n",
                Path::new("s"),
                "subordinate uids",
                WORKER_UIDS
            )
            .len()
                == 1
        );
    }

    #[test]
    fn idmap_passwd_and_group_entries_are_named() {
        let files = IdFiles {
            subuid: "/t/subuid".into(),
            subgid: "/t/subgid".into(),
            passwd: "/t/passwd".into(),
            group: "/t/group".into(),
        };
        let read = |p: &Path| -> Result<String, String> {
            Ok(match p.to_str().unwrap() {
                "/t/passwd" => {
                    "root:x:0:0::/root:/bin/sh\nsvc:x:5000:5001::/:/bin/false\n# x:x:5002:5002\n"
                        .into()
                }
                "/t/group" => "root:x:0:\nsvcgrp:x:5002:\n".into(),
                "/t/subgid" => "eve:4990:20\n".into(),
                _ => String::new(),
            })
        };
        let c = clashes(&files, (5000, 5002), &read).unwrap();
        let shown: Vec<String> = c.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "/t/subgid:1: subordinate gids 4990..=5009 of \"eve\" overlap worker_uids",
                "/t/passwd:2: uid 5000 of \"svc\" overlap worker_uids",
                "/t/passwd:2: primary gid 5001 of \"svc\" overlap worker_uids",
                "/t/group:2: gid 5002 of \"svcgrp\" overlap worker_uids",
            ]
        );
        assert!(clashes(&files, (6000, 7000), &read).unwrap().is_empty());
        let unreadable =
            |_: &Path| -> Result<String, String> { Err("cannot read /t/subuid: denied".into()) };
        assert!(clashes(&files, (1, 2), &unreadable).is_err());
    }

    #[test]
    fn idmap_malformed_lines_are_skipped() {
        let text = "garbage\nx:y:z\nok:10:0\n:5:5\n";
        let c = subid_clashes(text, Path::new("s"), "subordinate uids", (0, 100));
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].line, 4);
    }
}
