//! Choosing a frontend for this host and constructing its backend per minor.
//!
//! `frontend = "auto"` prefers ublk, then FUSE + loop, then the kernel nbd
//! client, then NBD. A frontend
//! is usable when it is built into this broker and the host has what it
//! needs; every one that is not says why, naming the kernel option.
//!
//! New backends plug in at the three functions marked PLUG-IN POINT below.

use super::{fuse, nbd, nbd_kernel, ublk, DeviceBackend, DeviceError};
use std::path::{Path, PathBuf};
use tapjail_common::proto::FrontendKind;
use tapjail_common::Minor;
use tapjail_policy::FrontendChoice;

/// What a backend is constructed from.
#[derive(Debug, Clone)]
pub struct DeviceContext {
    pub minor: Minor,
    /// The broker's state directory (root-only); backends keep their
    /// sockets, mount points and such below it.
    pub state_dir: PathBuf,
    /// Sockets per nbd-kernel device (policy `nbd_kernel_connections`).
    pub nbd_kernel_connections: usize,
}

/// PLUG-IN POINT 1: which frontends are built into this broker.
fn built(kind: FrontendKind) -> bool {
    matches!(
        kind,
        FrontendKind::Nbd | FrontendKind::Fuse | FrontendKind::Ublk | FrontendKind::NbdKernel
    )
}

/// PLUG-IN POINT 2: construct the backend of `kind`, or `None` if that
/// frontend is not built into this broker yet. When ublk lands:
/// `FrontendKind::Ublk => Some(ublk::UblkBackend::new(ctx).map(boxed))`.
fn construct(
    kind: FrontendKind,
    ctx: &DeviceContext,
) -> Option<Result<Box<dyn DeviceBackend>, DeviceError>> {
    fn boxed<B: DeviceBackend + 'static>(b: B) -> Box<dyn DeviceBackend> {
        Box::new(b)
    }
    match kind {
        FrontendKind::Nbd => Some(nbd::NbdBackend::new(ctx).map(boxed)),
        FrontendKind::Fuse => Some(fuse::FuseBackend::from_context(ctx).map(boxed)),
        FrontendKind::Ublk => Some(Ok(boxed(ublk::UblkBackend::for_minor(ctx)))),
        FrontendKind::NbdKernel => Some(Ok(boxed(nbd_kernel::NbdKernelBackend::new(ctx)))),
    }
}

/// PLUG-IN POINT 3: remove what a previous broker's backend of `kind` left
/// for `ctx.minor` (sockets, mounts, loop or ublk devices), returning what
/// was done. The caller holds the minor's lock.
fn cleanup(kind: FrontendKind, ctx: &DeviceContext) -> Result<Vec<String>, DeviceError> {
    match kind {
        FrontendKind::Nbd => nbd::cleanup_stale(ctx),
        FrontendKind::Fuse => fuse::cleanup_stale(ctx),
        FrontendKind::Ublk => ublk::cleanup_stale(ctx),
        FrontendKind::NbdKernel => nbd_kernel::cleanup_stale(ctx),
    }
}

/// Host requirements of each frontend: `(path, what provides it)`.
fn requirements(kind: FrontendKind) -> &'static [(&'static str, &'static str)] {
    match kind {
        FrontendKind::Ublk => &[(
            "/dev/ublk-control",
            "CONFIG_BLK_DEV_UBLK; try `modprobe ublk_drv`",
        )],
        FrontendKind::Fuse => &[
            ("/dev/fuse", "CONFIG_FUSE_FS; try `modprobe fuse`"),
            (
                "/dev/loop-control",
                "CONFIG_BLK_DEV_LOOP; try `modprobe loop`",
            ),
        ],
        FrontendKind::NbdKernel => &[(
            "/dev/nbd0",
            "kernel nbd driver not loaded: CONFIG_BLK_DEV_NBD; try `modprobe nbd`",
        )],
        FrontendKind::Nbd => &[],
    }
}

/// Why `kind` cannot be used here, or `None` if it can.
pub fn unavailable(kind: FrontendKind, dev_root: &Path) -> Option<String> {
    if !built(kind) {
        return Some(format!(
            "{}: frontend not built into this tap-broker yet",
            kind.as_str()
        ));
    }
    for (path, why) in requirements(kind) {
        // The requirements are spelled as absolute /dev paths; `dev_root`
        // stands for /dev.
        let rel = path
            .strip_prefix("/dev/")
            .unwrap_or(path.trim_start_matches('/'));
        let on_host = dev_root.join(rel);
        if !on_host.exists() {
            return Some(format!("{}: {path} missing ({why})", kind.as_str()));
        }
    }
    None
}

/// The frontend this broker uses for every minor, and why.
#[derive(Debug, Clone)]
pub struct DeviceFactory {
    kind: FrontendKind,
    explanation: String,
    state_dir: PathBuf,
    nbd_kernel_connections: usize,
    /// Where active devices keep their fds (see `crate::fdstore`).
    store: Option<std::sync::Arc<crate::fdstore::FdStore>>,
}

impl DeviceFactory {
    /// Pick the frontend for `choice` on this host (`/dev` as `dev_root`).
    pub fn new(
        choice: FrontendChoice,
        state_dir: &Path,
        dev_root: &Path,
    ) -> Result<DeviceFactory, DeviceError> {
        let order: &[FrontendKind] = match choice {
            FrontendChoice::Auto => &[
                FrontendKind::Ublk,
                FrontendKind::Fuse,
                FrontendKind::NbdKernel,
                FrontendKind::Nbd,
            ],
            FrontendChoice::Ublk => &[FrontendKind::Ublk],
            FrontendChoice::Fuse => &[FrontendKind::Fuse],
            FrontendChoice::Nbd => &[FrontendKind::Nbd],
            FrontendChoice::NbdKernel => &[FrontendKind::NbdKernel],
        };
        let mut skipped = Vec::new();
        for &kind in order {
            match unavailable(kind, dev_root) {
                None => {
                    let explanation = if skipped.is_empty() {
                        format!("frontend {}", kind.as_str())
                    } else {
                        format!(
                            "frontend {} ({} unavailable: {})",
                            kind.as_str(),
                            if skipped.len() == 1 {
                                "preferred one"
                            } else {
                                "preferred ones"
                            },
                            skipped.join("; ")
                        )
                    };
                    return Ok(DeviceFactory {
                        kind,
                        explanation,
                        state_dir: state_dir.to_path_buf(),
                        nbd_kernel_connections: 1,
                        store: None,
                    });
                }
                Some(why) => skipped.push(why),
            }
        }
        Err(DeviceError::Unavailable(skipped.join("; ")))
    }

    pub fn kind(&self) -> FrontendKind {
        self.kind
    }

    /// Connect each nbd-kernel device with `n` sockets (policy
    /// `nbd_kernel_connections`; 1 unless set).
    pub fn with_nbd_kernel_connections(mut self, n: u32) -> Self {
        self.nbd_kernel_connections = n as usize;
        self
    }

    /// Keep every active device's fds in `store`.
    pub fn with_store(mut self, store: std::sync::Arc<crate::fdstore::FdStore>) -> Self {
        self.store = Some(store);
        self
    }

    fn kept(&self, minor: Minor, b: Box<dyn DeviceBackend>) -> Box<dyn DeviceBackend> {
        match &self.store {
            Some(s) => Box::new(super::kept::KeptDevice::new(b, minor, s.clone())),
            None => b,
        }
    }

    /// One line for the log: which frontend and why the better ones are not used.
    pub fn explanation(&self) -> &str {
        &self.explanation
    }

    fn context(&self, minor: Minor) -> DeviceContext {
        DeviceContext {
            minor,
            state_dir: self.state_dir.clone(),
            nbd_kernel_connections: self.nbd_kernel_connections,
        }
    }

    /// A fresh backend for `minor`.
    pub fn create(&self, minor: Minor) -> Result<Box<dyn DeviceBackend>, DeviceError> {
        construct(self.kind, &self.context(minor))
            .unwrap_or_else(|| {
                Err(DeviceError::Unavailable(format!(
                    "{}: frontend not built into this tap-broker",
                    self.kind.as_str()
                )))
            })
            .map(|b| self.kept(minor, b))
    }

    /// Take over `minor`'s live device from a broker that is gone, from
    /// its record and the fds kept for it. The frontend is the recorded
    /// one (a broker restarted with another `frontend` still adopts).
    pub fn adopt(
        &self,
        minor: Minor,
        h: &super::Handoff,
        fds: &mut super::KeptFds,
    ) -> Result<Box<dyn DeviceBackend>, DeviceError> {
        let ctx = self.context(minor);
        let mut b: Box<dyn DeviceBackend> = match h.kind.as_str() {
            "fuse" => Box::new(super::fuse::FuseBackend::adopt(&ctx, h, fds)?),
            "nbd" => Box::new(super::nbd::NbdBackend::adopt(&ctx, fds)?),
            "ublk" => Box::new(super::ublk::UblkBackend::adopt(&ctx, h)?),
            "nbd-kernel" => Box::new(super::nbd_kernel::NbdKernelBackend::adopt(&ctx, h)?),
            other => {
                return Err(DeviceError::Failed(format!(
                    "unknown frontend {other:?} in the record"
                )))
            }
        };
        b.adopted(None);
        Ok(match &self.store {
            Some(s) => {
                let mut k = super::kept::KeptDevice::new(b, minor, s.clone());
                // Keep them again under this broker's guard (the store
                // handed back copies of what it held).
                k.keep();
                Box::new(k)
            }
            None => b,
        })
    }

    /// Clean what any frontend of a previous broker left for `minor`.
    pub fn cleanup_stale(&self, minor: Minor) -> Vec<Result<String, String>> {
        let ctx = self.context(minor);
        let mut out = Vec::new();
        for kind in [
            FrontendKind::Ublk,
            FrontendKind::Fuse,
            FrontendKind::NbdKernel,
            FrontendKind::Nbd,
        ] {
            match cleanup(kind, &ctx) {
                Ok(done) => out.extend(done.into_iter().map(Ok)),
                Err(e) => out.push(Err(format!("{}: {e}", kind.as_str()))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_auto_falls_back_to_nbd_and_says_why() {
        let dev = tempfile::tempdir().unwrap();
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Nbd);
        assert!(f.explanation().contains("ublk:"), "{}", f.explanation());
        assert!(f.explanation().contains("fuse:"), "{}", f.explanation());
    }

    #[test]
    fn factory_explicit_unavailable_frontend_names_the_reason() {
        let dev = tempfile::tempdir().unwrap();
        let e =
            DeviceFactory::new(FrontendChoice::Ublk, Path::new("/tmp"), dev.path()).unwrap_err();
        assert!(e.to_string().starts_with("ublk:"), "{e}");
        let f = DeviceFactory::new(FrontendChoice::Nbd, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.explanation(), "frontend nbd");
        assert_eq!(
            f.create(Minor::new(1).unwrap()).unwrap().kind(),
            FrontendKind::Nbd
        );
    }

    #[test]
    fn factory_auto_picks_fuse_without_ublk_and_says_why() {
        let dev = tempfile::tempdir().unwrap();
        for node in ["fuse", "loop-control"] {
            std::fs::write(dev.path().join(node), b"").unwrap();
        }
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Fuse);
        assert!(
            f.explanation()
                .starts_with("frontend fuse (preferred one unavailable: ublk:"),
            "{}",
            f.explanation()
        );
        assert_eq!(
            f.create(Minor::new(2).unwrap()).unwrap().kind(),
            FrontendKind::Fuse
        );
        // Without loop, fuse is skipped and says which node is missing.
        std::fs::remove_file(dev.path().join("loop-control")).unwrap();
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Nbd);
        assert!(
            f.explanation()
                .contains("fuse: /dev/loop-control missing (CONFIG_BLK_DEV_LOOP"),
            "{}",
            f.explanation()
        );
    }

    #[test]
    fn factory_nbd_kernel_without_the_driver_says_so_and_auto_falls_back() {
        let dev = tempfile::tempdir().unwrap();
        let e = DeviceFactory::new(FrontendChoice::NbdKernel, Path::new("/tmp"), dev.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("nbd-kernel: /dev/nbd0 missing (kernel nbd driver not loaded"),
            "{e}"
        );
        assert!(e.contains("modprobe nbd"), "{e}");
        // auto: after FUSE + loop, before plain NBD.
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Nbd);
        assert!(
            f.explanation().contains("nbd-kernel: /dev/nbd0 missing"),
            "{}",
            f.explanation()
        );
        std::fs::write(dev.path().join("nbd0"), b"").unwrap();
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::NbdKernel, "{}", f.explanation());
        for node in ["fuse", "loop-control"] {
            std::fs::write(dev.path().join(node), b"").unwrap();
        }
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Fuse, "FUSE + loop comes first");
        assert_eq!(
            f.create(Minor::new(4).unwrap()).unwrap().kind(),
            FrontendKind::Fuse
        );
        let f =
            DeviceFactory::new(FrontendChoice::NbdKernel, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(
            f.create(Minor::new(4).unwrap()).unwrap().kind(),
            FrontendKind::NbdKernel
        );
    }

    #[test]
    fn factory_auto_prefers_ublk_when_its_control_node_exists() {
        let dev = tempfile::tempdir().unwrap();
        std::fs::write(dev.path().join("ublk-control"), b"").unwrap();
        let f = DeviceFactory::new(FrontendChoice::Auto, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(f.kind(), FrontendKind::Ublk);
        assert_eq!(f.explanation(), "frontend ublk");
        let f = DeviceFactory::new(FrontendChoice::Ublk, Path::new("/tmp"), dev.path()).unwrap();
        assert_eq!(
            f.create(Minor::new(2).unwrap()).unwrap().kind(),
            FrontendKind::Ublk
        );
    }

    #[test]
    fn requirements_name_the_kernel_option() {
        let dev = tempfile::tempdir().unwrap();
        // Pretend the frontend were built: the requirement message is what
        // the operator sees once it is.
        for (path, why) in requirements(FrontendKind::Fuse) {
            assert!(path.starts_with("/dev/"));
            assert!(!dev.path().join(&path[5..]).exists());
            assert!(why.starts_with("CONFIG_"));
        }
        assert!(requirements(FrontendKind::Ublk)[0]
            .1
            .contains("CONFIG_BLK_DEV_UBLK"));
    }
}
