//! cgroup v2 limits per worker: each worker runs in
//! `<root>/<tenant>/<minor>` (`leaf`), limited in memory (no swap) and
//! tasks, its tenant's cgroup weighted for CPU and I/O against the others.
//!
//! The subtree (`root`) is the policy's `cgroup_root`, or a `tapjail`
//! child of the cgroup tap-broker was started in, which must be delegated
//! to it (systemd: `Delegate=yes`); there tap-broker moves itself into a
//! `broker` leaf first (cgroup v2 gives controllers only to the children
//! of a cgroup without processes) and enables the controllers for its
//! children. Without cgroup v2, or without a usable subtree, [`Cgroups::start`]
//! says why: fatal with `cgroups = "required"`, a warning with `"auto"`.
//! Detection only reads; nothing is written outside the subtree and the
//! delegated cgroup above it.

pub mod detect;
pub mod leaf;
pub mod memfs;

pub use leaf::{Leaf, Limits};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use tapjail_policy::{CgroupMode, CgroupPolicy, TenantCgroup};

/// The controllers every worker's cgroup needs.
pub const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "io"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup v2 is not mounted (no cgroup2 filesystem in /proc/self/mountinfo{v1}): worker \
         memory, task, CPU and I/O limits need the unified hierarchy (boot with \
         systemd.unified_cgroup_hierarchy=1, or mount cgroup2)"
    )]
    NotMounted { v1: String },
    #[error(
        "cgroup v2 is mounted at {mount} but without controller(s) {missing}: this host binds \
         them to cgroup v1 hierarchies ({v1}), a hybrid setup; worker limits need them on the \
         unified hierarchy (boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    Hybrid {
        mount: String,
        missing: String,
        v1: String,
    },
    #[error(
        "cgroup_root {root} is not on a cgroup v2 filesystem (cgroup2 is mounted at {mounts})"
    )]
    NotOnCgroup2 { root: String, mounts: String },
    #[error("cannot tell which cgroup tap-broker runs in: /proc/self/cgroup has no `0::` line")]
    NoOwnCgroup,
    #[error("{path}: {what}: {source}{hint}")]
    Io {
        path: String,
        what: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "cgroup controller(s) {missing} not available in {root} (its cgroup.controllers lists \
         \"{have}\"): {hint}"
    )]
    MissingControllers {
        root: String,
        missing: String,
        have: String,
        hint: String,
    },
}

impl CgroupError {
    fn io(path: &Path, what: String, source: io::Error) -> CgroupError {
        let hint = match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => {
                "; the cgroup subtree is not delegated to tap-broker (systemd: Delegate=yes in its \
                 unit; elsewhere point cgroup_root at a cgroup root may write)"
            }
            _ => "",
        };
        CgroupError::Io {
            path: path.display().to_string(),
            what,
            source,
            hint,
        }
    }
}

#[derive(Debug)]
enum State {
    /// `cgroups = "off"`.
    Off,
    /// `cgroups = "auto"` on a host where they cannot be used: why.
    Unavailable(String),
    Active {
        mount: PathBuf,
        root: PathBuf,
    },
}

/// The broker's cgroup subtree and the worker cgroups in it.
#[derive(Debug)]
pub struct Cgroups {
    state: State,
    limits: Limits,
    /// Every leaf in use, by path, so that a respawned worker shares its
    /// predecessor's and a leaf is removed with its last user.
    leaves: Mutex<HashMap<PathBuf, Weak<Leaf>>>,
}

impl Cgroups {
    fn with(state: State, p: &CgroupPolicy) -> Cgroups {
        Cgroups {
            state,
            limits: Limits {
                memory_max: p.memory_max,
                pids_max: p.pids_max,
            },
            leaves: Mutex::new(HashMap::new()),
        }
    }

    /// No cgroups (`cgroups = "off"`, and tests of other parts).
    pub fn off() -> Cgroups {
        Cgroups::with(
            State::Off,
            &CgroupPolicy {
                mode: CgroupMode::Off,
                root: None,
                memory_max: 0,
                pids_max: 0,
            },
        )
    }

    /// Set up the subtree as the policy says. An error only with
    /// `cgroups = "required"`; with `"auto"` an unusable host gives a
    /// `Cgroups` that places nothing and says why ([`Cgroups::warning`]).
    pub fn start(p: &CgroupPolicy) -> Result<Cgroups, CgroupError> {
        if p.mode == CgroupMode::Off {
            return Ok(Cgroups::with(State::Off, p));
        }
        match setup(p) {
            Ok((mount, root)) => Ok(Cgroups::with(State::Active { mount, root }, p)),
            Err(e) if p.mode == CgroupMode::Required => Err(e),
            Err(e) => Ok(Cgroups::with(State::Unavailable(e.to_string()), p)),
        }
    }

    /// The subtree, when workers are placed in cgroups.
    pub fn root(&self) -> Option<&Path> {
        match &self.state {
            State::Active { root, .. } => Some(root),
            _ => None,
        }
    }

    /// Why workers run without cgroups under `cgroups = "auto"`.
    pub fn warning(&self) -> Option<String> {
        match &self.state {
            State::Unavailable(why) => Some(format!(
                "cgroups unavailable, workers run without memory, task, CPU and I/O limits \
                 (cgroups = \"required\" refuses to start instead): {why}"
            )),
            _ => None,
        }
    }

    /// For the start banner.
    pub fn describe(&self) -> String {
        match &self.state {
            State::Off => "cgroups off".into(),
            State::Unavailable(_) => "no cgroups (see warning)".into(),
            State::Active { root, .. } => format!(
                "worker cgroups in {}/TENANT/MINOR (memory.max {} MiB, pids.max {})",
                root.display(),
                self.limits.memory_max >> 20,
                self.limits.pids_max
            ),
        }
    }

    /// The cgroup for a worker of `tenant` named `name` (its minor, or
    /// `spawn-UID` before it is attached), created with the limits and
    /// the tenant's weights; `None` without cgroups.
    pub fn leaf(
        &self,
        tenant: &str,
        weights: TenantCgroup,
        name: &str,
    ) -> Result<Option<Arc<Leaf>>, CgroupError> {
        let Some(root) = self.root() else {
            return Ok(None);
        };
        let tdir = root.join(tenant);
        let path = tdir.join(name);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = leaves.get(&path).and_then(Weak::upgrade) {
            return Ok(Some(l));
        }
        leaf::mkdir(&tdir)?;
        leaf::write(&tdir, "cpu.weight", &weights.cpu_weight.to_string())?;
        leaf::write_if_present(
            &tdir,
            "io.weight",
            &format!("default {}", weights.io_weight),
        )?;
        enable(&tdir)?;
        let l = Arc::new(Leaf::create(path.clone(), self.limits)?);
        leaves.retain(|_, w| w.strong_count() > 0);
        leaves.insert(path, Arc::downgrade(&l));
        Ok(Some(l))
    }

    /// Why a worker writing the image on device `dev` (`st_dev`) at
    /// `path` may fail short of its disk's size: the image is on a memory
    /// filesystem, so its data counts toward the worker's memory.max
    /// ([`memfs`]). `None` without cgroups or on other filesystems.
    pub fn memory_image_warning(&self, dev: u64, path: &Path) -> Option<String> {
        self.root()?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let fs = memfs::memory_fs(&mountinfo, dev)?;
        Some(format!(
            "image {} is on {fs}: the data written to it is memory charged to its worker's \
             cgroup (memory.max {} MiB, no swap), so I/O fails once the worker's memory and \
             that data reach it; keep images on disk storage, or raise worker_memory_max_mib \
             to hold the image",
            path.display(),
            self.limits.memory_max >> 20
        ))
    }

    /// The leaf an adopted worker (a previous broker's) is in, if it is one
    /// of this subtree's.
    pub fn adopt(&self, pid: u32) -> Option<Arc<Leaf>> {
        let State::Active { mount, root } = &self.state else {
            return None;
        };
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = detect::join(mount, detect::unified_path(&text)?);
        if path.parent().and_then(Path::parent) != Some(root.as_path()) {
            return None;
        }
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = leaves.get(&path).and_then(Weak::upgrade) {
            return Some(l);
        }
        let l = Arc::new(Leaf::existing(path.clone()));
        // A broker killed while this worker started left its start-up
        // weight; it is adopted serving.
        if let Err(e) = l.serving() {
            tracing::warn!("adopted worker {pid}'s cgroup: {e}");
        }
        leaves.insert(path, Arc::downgrade(&l));
        Some(l)
    }

    /// Remove the cgroups no worker of this broker uses (left by a broker
    /// that was killed, or by workers that died while none ran). Returns
    /// what was done and what could not be.
    pub fn remove_stale(&self) -> (Vec<String>, Vec<String>) {
        let (mut done, mut problems) = (Vec::new(), Vec::new());
        let Some(root) = self.root() else {
            return (done, problems);
        };
        let leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        let in_use = |p: &Path| leaves.get(p).is_some_and(|w| w.strong_count() > 0);
        for tdir in subdirs(root) {
            for ldir in subdirs(&tdir) {
                if in_use(&ldir) {
                    continue;
                }
                match leaf::is_populated(&ldir) {
                    Ok(true) => problems.push(format!(
                        "cgroup {} holds processes no worker of this broker owns: left in place",
                        ldir.display()
                    )),
                    _ => match fs::remove_dir(&ldir) {
                        Ok(()) => done.push(format!("removed stale cgroup {}", ldir.display())),
                        Err(e) => problems.push(format!("removing cgroup {}: {e}", ldir.display())),
                    },
                }
            }
            if subdirs(&tdir).is_empty() && fs::remove_dir(&tdir).is_ok() {
                done.push(format!("removed empty tenant cgroup {}", tdir.display()));
            }
        }
        (done, problems)
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn words(dir: &Path, file: &str) -> Result<Vec<String>, CgroupError> {
    let path = dir.join(file);
    fs::read_to_string(&path)
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .map_err(|e| CgroupError::io(&path, "reading".into(), e))
}

/// Give `dir`'s children the controllers (in its cgroup.subtree_control).
fn enable(dir: &Path) -> Result<(), CgroupError> {
    let have = words(dir, "cgroup.controllers")?;
    let on = words(dir, "cgroup.subtree_control")?;
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        let parent = dir.parent().unwrap_or(dir);
        return Err(CgroupError::MissingControllers {
            root: dir.display().to_string(),
            missing: missing.join(", "),
            have: have.join(" "),
            hint: format!(
                "enable them in {}/cgroup.subtree_control (under systemd: Delegate=yes)",
                parent.display()
            ),
        });
    }
    for c in CONTROLLERS {
        if on.iter().any(|h| h == c) {
            continue;
        }
        if let Err(e) = leaf::write(dir, "cgroup.subtree_control", &format!("+{c}")) {
            let busy = matches!(&e, CgroupError::Io { source, .. } if source.raw_os_error() == Some(libc::EBUSY));
            if busy {
                return Err(CgroupError::MissingControllers {
                    root: dir.display().to_string(),
                    missing: c.into(),
                    have: have.join(" "),
                    hint: format!(
                        "it cannot be enabled for its children because {} holds processes \
                         (cgroup v2 gives controllers only to the children of a cgroup without \
                         processes): run tap-broker in a cgroup of its own (systemd: \
                         Delegate=yes) or set cgroup_root",
                        dir.display()
                    ),
                });
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Find or make the subtree; returns (cgroup2 mount, subtree).
fn setup(p: &CgroupPolicy) -> Result<(PathBuf, PathBuf), CgroupError> {
    let read = |path: &str| {
        fs::read_to_string(path).map_err(|e| CgroupError::io(Path::new(path), "reading".into(), e))
    };
    let mountinfo = read("/proc/self/mountinfo")?;
    let mounts = detect::cgroup2_mounts(&mountinfo);
    if mounts.is_empty() {
        let v1 = detect::v1_hierarchies(&mountinfo);
        let v1 = if v1.is_empty() {
            String::new()
        } else {
            format!("; this host has cgroup v1 hierarchies: {}", v1.join(" "))
        };
        return Err(CgroupError::NotMounted { v1 });
    }
    let mount = match &p.root {
        Some(root) => mounts
            .iter()
            .filter(|m| root.starts_with(m) && root != *m)
            .max_by_key(|m| m.as_os_str().len())
            .ok_or_else(|| CgroupError::NotOnCgroup2 {
                root: root.display().to_string(),
                mounts: mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
            .clone(),
        None => mounts[0].clone(),
    };
    // Before anything is written: a hybrid host (controllers bound to v1)
    // is only reported; its cgroups are the machine's.
    let have = words(&mount, "cgroup.controllers")?;
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::Hybrid {
            mount: mount.display().to_string(),
            missing: missing.join(", "),
            v1: detect::v1_hierarchies(&mountinfo).join(" "),
        });
    }
    let root = match &p.root {
        Some(root) => {
            // Each missing level below the mount, top down.
            let rel = root.strip_prefix(&mount).unwrap_or(Path::new(""));
            let mut at = mount.clone();
            for c in rel.components() {
                at.push(c);
                leaf::mkdir(&at)?;
            }
            root.clone()
        }
        None => {
            let own = read("/proc/self/cgroup")?;
            let own = detect::unified_path(&own).ok_or(CgroupError::NoOwnCgroup)?;
            let mine = detect::join(&mount, own);
            // The real root (no cgroup.events) may hold processes and
            // still give controllers; a cgroup namespace's root may not.
            let delegated = if mine == mount && !mine.join("cgroup.events").exists() {
                mine
            } else if mine.file_name().is_some_and(|n| n == "broker") {
                // Already in its leaf (a restart, or systemd's
                // DelegateSubgroup=broker).
                mine.parent().unwrap_or(&mount).to_path_buf()
            } else {
                // Only a cgroup that was given the controllers is ours to
                // reshape: check before moving anything.
                let have = words(&mine, "cgroup.controllers")?;
                if let Some(c) = CONTROLLERS.iter().find(|c| !have.iter().any(|h| h == *c)) {
                    return Err(CgroupError::MissingControllers {
                        root: mine.display().to_string(),
                        missing: (*c).into(),
                        have: have.join(" "),
                        hint:
                            "tap-broker's cgroup is not delegated to it (systemd: Delegate=yes), \
                               or set cgroup_root"
                                .into(),
                    });
                }
                let leaf = mine.join("broker");
                leaf::mkdir(&leaf)?;
                leaf::write(&leaf, "cgroup.procs", &std::process::id().to_string())?;
                mine
            };
            enable(&delegated)?;
            let root = delegated.join("tapjail");
            leaf::mkdir(&root)?;
            root
        }
    };
    match detect::fs_type(&root) {
        Ok(t) if t == detect::CGROUP2_SUPER_MAGIC => {}
        Ok(_) => {
            return Err(CgroupError::NotOnCgroup2 {
                root: root.display().to_string(),
                mounts: mount.display().to_string(),
            })
        }
        Err(e) => return Err(CgroupError::io(&root, "statfs".into(), e)),
    }
    enable(&root)?;
    Ok((mount, root))
}
