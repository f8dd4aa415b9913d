//! Opening an image for a tenant. The rule: the broker never hands a
//! tenant a file she could not open herself, never waits on an open
//! forever, and never lets two writers at one image.
//!
//! Each open runs in a short-lived helper process ([`helper`]), forked by
//! the broker's small image opener process ([`opener`]) or, without one,
//! by the broker itself, that:
//! 1. takes the tenant's filesystem identity (her uid and gid, no
//!    supplementary groups), so the kernel's permission checks are hers;
//! 2. opens the root without following symlinks and the file beneath it
//!    with `RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV`
//!    (`tapjail_common::sys`), so no mount planted under a root is used;
//! 3. refuses a file her uids do not own, or with more than one link
//!    (a hard link to someone else's file), unless the root is
//!    `shared_readonly` (gold masters, read-only);
//! 4. takes qemu-compatible OFD locks on it ([`locks`]): one writer, or
//!    any number of readers.
//!
//! The broker kills the helper at the deadline, so a FUSE or NFS server
//! that never answers costs one request its deadline, not the broker.

pub mod helper;
pub mod locks;
pub mod opener;
pub mod opener_main;
pub mod wire;

use crate::error::BrokerError;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;
use tapjail_common::sys::BeneathError;
use tapjail_policy::ImageGrant;

/// An image opened (and locked) for a tenant.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// (device, inode), from the helper's `fstat` (the broker does not
    /// stat the file itself: on FUSE that could wait on the server).
    pub id: (u64, u64),
}

fn cstring(p: &Path, shown: &str) -> Result<CString, BrokerError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| BrokerError::invalid(format!("{shown}: the path contains a NUL byte")))
}

/// How long a lock whose holder has no fd anywhere is waited for: a
/// worker that just closed an image (or died) may still have it in an
/// io_uring's registered files, which the kernel drops a moment later.
const LINGER: Duration = Duration::from_secs(2);

/// Within this, a conflict is retried without looking for its holder.
const QUICK_RETRIES: Duration = Duration::from_millis(100);

/// Open `grant` for its tenant, read-write if `writable`, waiting at most
/// `deadline` per attempt. On a lock conflict `local` is asked first
/// whether this broker itself serves the file (to say so); a lock held by
/// no visible process is retried for up to [`LINGER`]. Errors say why in
/// terms of the request.
pub fn open(
    grant: &ImageGrant,
    writable: bool,
    deadline: Duration,
    local: &dyn Fn((u64, u64)) -> Option<BrokerError>,
) -> Result<Opened, BrokerError> {
    open_as(grant, writable, helper::Action::Open, deadline, local)
}

/// [`open`] read-write, creating the file (0600, the tenant's) if it is
/// missing: a CBT log of `tap-ctl cbt start`.
pub fn open_or_create(
    grant: &ImageGrant,
    deadline: Duration,
    local: &dyn Fn((u64, u64)) -> Option<BrokerError>,
) -> Result<Opened, BrokerError> {
    open_as(grant, true, helper::Action::OpenOrCreate, deadline, local)
}

fn open_as(
    grant: &ImageGrant,
    writable: bool,
    action: helper::Action<'_>,
    deadline: Duration,
    local: &dyn Fn((u64, u64)) -> Option<BrokerError>,
) -> Result<Opened, BrokerError> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match open_once(grant, writable, action, deadline)? {
            Ok(o) => return Ok(o),
            Err(helper::Outcome::Lock(locks::LockFailure::Conflict(byte), st)) => {
                if let Some(e) = local((st.dev, st.ino)) {
                    return Err(e);
                }
                // A lock let go a moment ago is common (an image reopened
                // right after its worker stopped): retry a few times before
                // the costlier search for a holder.
                if started.elapsed() < QUICK_RETRIES {
                    std::thread::sleep(pause);
                    pause *= 2;
                    continue;
                }
                let holders = locks::holders(st.dev, st.ino, byte);
                if holders.is_empty() && started.elapsed() < LINGER {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(250));
                    continue;
                }
                return Err(BrokerError::busy(in_use(
                    &grant.path.display().to_string(),
                    byte,
                    &holders,
                )));
            }
            Err(o) => return Err(explain(o, grant, &grant.path.display().to_string())),
        }
    }
}

/// Create `grant`'s file for its tenant: a new file (never an existing
/// one), read-write, locked as a writable leaf. For an online snapshot's
/// child.
pub fn create(grant: &ImageGrant, deadline: Duration) -> Result<Opened, BrokerError> {
    let shown = grant.path.display().to_string();
    match once(grant, true, locks::WRITER, helper::Action::Create, deadline)? {
        Ok(o) => Ok(o),
        Err(o) => Err(explain(o, grant, &shown)),
    }
}

/// Open the leaf `grant` names read-only while its worker still writes
/// it, to become the parent of an online snapshot (see
/// [`locks::LEAF_BECOMING_PARENT`]).
pub fn open_leaf_as_parent(grant: &ImageGrant, deadline: Duration) -> Result<Opened, BrokerError> {
    let shown = grant.path.display().to_string();
    match once(
        grant,
        false,
        locks::LEAF_BECOMING_PARENT,
        helper::Action::Open,
        deadline,
    )? {
        Ok(o) => Ok(o),
        Err(o) => Err(explain(o, grant, &shown)),
    }
}

/// Open the read cache `grant` names read-only as the parent of an `-e`
/// clone while the cache's worker writes it (see [`locks::CACHE_READER`]).
pub fn open_cache_reader(grant: &ImageGrant, deadline: Duration) -> Result<Opened, BrokerError> {
    let shown = grant.path.display().to_string();
    match once(
        grant,
        false,
        locks::CACHE_READER,
        helper::Action::Open,
        deadline,
    )? {
        Ok(o) => Ok(o),
        Err(o) => Err(explain(o, grant, &shown)),
    }
}

/// Open `grant` read-write for an online coalesce while its worker holds
/// it: the served leaf again (`leaf`, a stream) or its parent (a commit);
/// see [`locks::LEAF_AGAIN`] and [`locks::PARENT_BECOMING_LEAF`].
pub fn reopen_for_coalesce(
    grant: &ImageGrant,
    leaf: bool,
    deadline: Duration,
) -> Result<Opened, BrokerError> {
    let shown = grant.path.display().to_string();
    let plan = if leaf {
        locks::LEAF_AGAIN
    } else {
        locks::PARENT_BECOMING_LEAF
    };
    match once(grant, true, plan, helper::Action::Open, deadline)? {
        Ok(o) => Ok(o),
        Err(o) => Err(explain(o, grant, &shown)),
    }
}

/// Remove `grant`'s file, with its tenant's credentials, if it is still
/// the file `id`: a snapshot child this broker created and never used.
pub fn remove(grant: &ImageGrant, id: (u64, u64), deadline: Duration) -> Result<(), BrokerError> {
    let shown = grant.path.display().to_string();
    let rel = &grant.relative;
    let dir = rel
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = rel
        .file_name()
        .ok_or_else(|| BrokerError::invalid(format!("{shown}: names no file")))?;
    let dir = cstring(dir, &shown)?;
    let base = cstring(Path::new(base), &shown)?;
    let action = helper::Action::Remove {
        dir: &dir,
        base: &base,
        id,
    };
    match once(grant, false, locks::NONE, action, deadline)? {
        Ok(_) => Ok(()),
        Err(o) => Err(explain(o, grant, &shown)),
    }
}

/// One attempt: the helper's answer, or an error that ends the open.
fn open_once(
    grant: &ImageGrant,
    writable: bool,
    action: helper::Action<'_>,
    deadline: Duration,
) -> Result<Result<Opened, helper::Outcome>, BrokerError> {
    let lock = if writable {
        locks::WRITER
    } else {
        locks::READER
    };
    once(grant, writable, lock, action, deadline)
}

/// One helper run doing `action` on `grant` with `lock`.
fn once(
    grant: &ImageGrant,
    writable: bool,
    lock: locks::LockPlan,
    action: helper::Action<'_>,
    deadline: Duration,
) -> Result<Result<Opened, helper::Outcome>, BrokerError> {
    let shown = grant.path.display().to_string();
    let root_shown = grant.root.display();
    if writable && grant.shared {
        return Err(BrokerError::denied(format!(
            "{shown}: in the shared read-only image root {root_shown}: refusing to open it \
             writable (use -R)"
        )));
    }
    let root = cstring(&grant.root, &shown)?;
    let relative = cstring(&grant.relative, &shown)?;
    let as_ = &grant.open_as;
    let plan = helper::Plan {
        root: &root,
        relative: &relative,
        writable,
        uid: as_.uid,
        gid: as_.gid,
        owners: if grant.shared { &[] } else { &as_.owners },
        lock,
        action,
    };
    let got = helper::run(&plan, deadline).map_err(|e| match e {
        helper::HelperError::Deadline(d) => BrokerError::failed(format!(
            "{shown}: opening it took longer than {} s: refused (is a filesystem under the \
             image root {root_shown} not answering, such as FUSE or NFS?)",
            d.as_secs_f32()
        )),
        helper::HelperError::TooManyStuck => BrokerError::busy(format!("{shown}: {e}")),
        e => BrokerError::failed(format!("{shown}: {e}")),
    })?;
    Ok(got.map(|(fd, st)| Opened {
        file: File::from(fd),
        id: (st.dev, st.ino),
    }))
}

fn explain(o: helper::Outcome, grant: &ImageGrant, shown: &str) -> BrokerError {
    use helper::Outcome;
    let root = grant.root.display();
    let uid = grant.open_as.uid;
    match o {
        Outcome::Creds(e) => BrokerError::failed(format!(
            "{shown}: cannot take uid {uid}'s credentials to open it: {}",
            std::io::Error::from_raw_os_error(e)
        )),
        Outcome::Root(libc::ELOOP) => BrokerError::denied(format!(
            "{shown}: its image root {root} is reached through a symlink: refused (an \
             admin must name the root's real path in the policy, and keep it out of \
             tenants' reach)"
        )),
        Outcome::Root(libc::EACCES) | Outcome::Root(libc::EPERM) => BrokerError::denied(format!(
            "{shown}: uid {uid} may not reach the image root {root} (images are opened with \
             the tenant's own permissions)"
        )),
        Outcome::Root(libc::ENOENT) | Outcome::Root(libc::ENOTDIR) => BrokerError::not_found(
            format!("{shown}: the image root {root} does not exist (or is not a directory)"),
        ),
        Outcome::Root(e) => BrokerError::failed(format!(
            "{shown}: opening the image root {root}: {}",
            std::io::Error::from_raw_os_error(e)
        )),
        Outcome::Open(BeneathError::NotRegular) => BrokerError::invalid(format!(
            "{shown}: not a regular file (a directory, FIFO, socket or device): refused \
             (images and parents must be regular files)"
        )),
        Outcome::Open(BeneathError::Os(e)) => match e {
            libc::ELOOP => BrokerError::denied(format!(
                "{shown}: is a symlink or passes through one: refused (images and parents \
                 must be regular files, symlinks are refused; name the image by its real path)"
            )),
            libc::EXDEV => BrokerError::denied(format!(
                "{shown}: crosses a mount point below the image root {root}, or leaves it: \
                 refused (a filesystem mounted inside an image root is not used)"
            )),
            libc::ENOENT | libc::ENOTDIR => {
                BrokerError::not_found(format!("{shown}: no such image file"))
            }
            libc::EACCES | libc::EPERM => BrokerError::denied(format!(
                "{shown}: permission denied for uid {uid} (images are opened with the \
                 tenant's own permissions)"
            )),
            libc::EROFS => BrokerError::denied(format!(
                "{shown}: on a read-only filesystem (open it with -R)"
            )),
            libc::EISDIR => BrokerError::invalid(format!("{shown}: is a directory")),
            libc::EEXIST => BrokerError::invalid(format!(
                "{shown}: already exists: refused (a snapshot's child must be a new file; \
                 name one that does not exist)"
            )),
            libc::ESTALE => BrokerError::failed(format!(
                "{shown}: no longer the file the broker created: left in place"
            )),
            e => BrokerError::failed(format!("{shown}: {}", std::io::Error::from_raw_os_error(e))),
        },
        Outcome::NotOwned(st) => BrokerError::denied(format!(
            "{shown}: owned by uid {}, which is not the tenant's ({}): refused (the broker \
             hands a tenant only her own files; gold masters belong in a root marked \
             `shared_readonly = true`)",
            st.uid,
            owners(&grant.open_as.owners)
        )),
        Outcome::Linked(st) => BrokerError::denied(format!(
            "{shown}: has {} hard links: refused (another name of the same file may be \
             someone else's; keep images at one link, or put shared ones in a \
             `shared_readonly` root)",
            st.nlink
        )),
        Outcome::Lock(locks::LockFailure::Os(e), _) => BrokerError::failed(format!(
            "{shown}: cannot take its image lock (qemu-compatible OFD lock): {} (does the \
             filesystem support locks?)",
            std::io::Error::from_raw_os_error(e)
        )),
        Outcome::Lock(locks::LockFailure::Conflict(byte), st) => {
            BrokerError::busy(in_use(shown, byte, &locks::holders(st.dev, st.ino, byte)))
        }
    }
}

fn owners(o: &[u32]) -> String {
    o.iter()
        .map(|u| format!("uid {u}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "IMAGE is in use: PROCESS is writing it", naming the holder when
/// `/proc` shows it.
fn in_use(shown: &str, byte: i64, holders: &[locks::Holder]) -> String {
    let who = if holders.is_empty() {
        "another process (qemu or another tapjail broker)".to_string()
    } else {
        holders
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{shown}: in use: held by {who}, which {} (qemu-compatible image lock): refused",
        locks::describe(byte)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, PermissionsExt};
    use std::path::PathBuf;
    use tapjail_policy::OpenAs;

    const TENANT: u32 = 54_321;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A root the tenant can reach, in a temp dir only root can write.
    fn root() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        chown(&root, Some(TENANT), Some(TENANT)).unwrap();
        (dir, root)
    }

    fn grant(root: &Path, rel: &str, shared: bool) -> ImageGrant {
        ImageGrant {
            path: root.join(rel),
            root: root.to_path_buf(),
            relative: PathBuf::from(rel),
            read_only: false,
            open_as: OpenAs {
                uid: TENANT,
                gid: TENANT,
                owners: vec![TENANT],
            },
            shared,
        }
    }

    fn file(p: &Path, owner: u32, mode: u32) {
        std::fs::write(p, b"secret bytes").unwrap();
        chown(p, Some(owner), Some(owner)).unwrap();
        chmod(p, mode);
    }

    const D: Duration = Duration::from_secs(5);

    fn open_t(g: &ImageGrant, writable: bool, d: Duration) -> Result<Opened, BrokerError> {
        open(g, writable, d, &|_| None)
    }

    #[test]
    fn image_open_hands_a_tenant_only_her_own_single_link_files() {
        let (dir, r) = root();
        file(&r.join("mine.img"), TENANT, 0o600);
        assert!(open_t(&grant(&r, "mine.img", false), true, D).is_ok());
        // A root-only file hard-linked into her root (what she can do
        // herself where fs.protected_hardlinks=0): her credentials cannot
        // open it, and it is not hers.
        let secret = dir.path().join("shadow");
        file(&secret, 0, 0o600);
        std::fs::hard_link(&secret, r.join("link.img")).unwrap();
        for writable in [true, false] {
            let e = open_t(&grant(&r, "link.img", false), writable, D).unwrap_err();
            assert!(e.message.contains("permission denied for uid 54321"), "{e}");
        }
        // Readable by her but someone else's: refused as not hers.
        chmod(&secret, 0o644);
        let e = open_t(&grant(&r, "link.img", false), false, D).unwrap_err();
        assert!(e.message.contains("owned by uid 0"), "{e}");
        // Her own file with a second name somewhere: refused.
        file(&r.join("two.img"), TENANT, 0o600);
        std::fs::hard_link(r.join("two.img"), dir.path().join("elsewhere")).unwrap();
        let e = open_t(&grant(&r, "two.img", false), false, D).unwrap_err();
        assert!(e.message.contains("has 2 hard links"), "{e}");
        // A root she may not search, or not reach, is refused with her
        // uid named.
        chmod(&r, 0o700);
        chown(&r, Some(0), Some(0)).unwrap();
        let e = open_t(&grant(&r, "mine.img", false), false, D).unwrap_err();
        assert!(e.message.contains("permission denied for uid 54321"), "{e}");
        chmod(dir.path(), 0o700);
        let e = open_t(&grant(&r, "mine.img", false), false, D).unwrap_err();
        assert!(e.message.contains("uid 54321 may not reach"), "{e}");
    }

    #[test]
    fn image_open_shared_root_is_read_only_and_still_needs_read_permission() {
        let (_dir, r) = root();
        file(&r.join("gold.vhd"), 0, 0o644);
        file(&r.join("private.vhd"), 0, 0o600);
        let g = grant(&r, "gold.vhd", true);
        assert!(open_t(&g, false, D).is_ok());
        let e = open_t(&g, true, D).unwrap_err();
        assert!(e.message.contains("shared read-only"), "{e}");
        let e = open_t(&grant(&r, "private.vhd", true), false, D).unwrap_err();
        assert!(e.message.contains("permission denied"), "{e}");
    }

    #[test]
    fn image_open_one_writer_or_many_readers() {
        let (_dir, r) = root();
        file(&r.join("a.img"), TENANT, 0o600);
        let g = grant(&r, "a.img", false);
        let w = open_t(&g, true, D).unwrap();
        let e = open_t(&g, true, D).unwrap_err();
        assert!(
            e.message.contains("in use: held by another process")
                && e.message.contains("allows no other writer"),
            "{e}"
        );
        assert!(open_t(&g, false, D)
            .unwrap_err()
            .message
            .contains("is writing it"));
        drop(w);
        let r1 = open_t(&g, false, D).unwrap();
        let _r2 = open_t(&g, false, D).unwrap();
        assert!(open_t(&g, true, D).is_err());
        drop(r1);
    }

    #[test]
    fn image_open_refuses_a_mount_under_the_root() {
        let (_dir, r) = root();
        std::fs::create_dir(r.join("mnt")).unwrap();
        let inner = tempfile::tempdir().unwrap();
        file(&inner.path().join("x.img"), TENANT, 0o600);
        let m = Mount::bind(inner.path(), &r.join("mnt"));
        let e = open_t(&grant(&r, "mnt/x.img", false), false, D).unwrap_err();
        assert!(e.message.contains("crosses a mount point"), "{e}");
        drop(m);
    }

    /// A FUSE filesystem mounted over the image root whose server never
    /// answers: the open ends at its deadline, the helper is killed and
    /// reaped, and nothing is left stuck.
    #[test]
    fn image_open_of_a_root_on_a_dead_fuse_server_ends_at_the_deadline() {
        let (_dir, r) = root();
        let fuse = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            Ok(f) => f,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                tapjail_common::log_line!("skipped: /dev/fuse: {e}");
                return;
            }
            Err(e) => panic!("/dev/fuse: {e}"),
        };
        use std::os::fd::AsRawFd;
        let m = Mount::fuse(&r, fuse.as_raw_fd());
        let started = std::time::Instant::now();
        let e = open_t(&grant(&r, "x.img", false), false, Duration::from_secs(1)).unwrap_err();
        let took = started.elapsed();
        assert!(e.message.contains("took longer than 1 s"), "{e}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert_eq!(helper::stuck(), 0, "the killed helper was reaped");
        drop(fuse);
        drop(m);
    }

    /// A mount for one test, detached on drop.
    struct Mount(PathBuf);

    impl Mount {
        fn bind(from: &Path, to: &Path) -> Mount {
            let (f, t) = (cpath(from), cpath(to));
            // SAFETY: mount with valid NUL-terminated paths and no data.
            let rc = unsafe {
                libc::mount(
                    f.as_ptr(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
            Mount(to.to_path_buf())
        }

        fn fuse(at: &Path, fd: i32) -> Mount {
            let t = cpath(at);
            let data = CString::new(format!(
                "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other"
            ))
            .unwrap();
            // SAFETY: mount with valid NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    c"tapjail-test".as_ptr(),
                    t.as_ptr(),
                    c"fuse".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    data.as_ptr().cast(),
                )
            };
            assert_eq!(rc, 0, "fuse mount: {}", std::io::Error::last_os_error());
            Mount(at.to_path_buf())
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let t = cpath(&self.0);
            // SAFETY: umount2 with a valid path.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }

    fn cpath(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }
}
