//! Step 11: a landlock ruleset that denies all filesystem access.
//!
//! The worker never opens a path: every file it uses arrives as an fd. So
//! the ruleset handles every filesystem right and grants none. Landlock ABI 1
//! (Linux 5.13: all basic filesystem rights) is a hard requirement; rights of
//! later ABIs (refer, truncate, device ioctl; TCP bind/connect; the
//! abstract-socket and signal scopes) are added where the kernel has them.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus,
    Scope, ABI,
};

/// The ABI whose rights are required.
pub const REQUIRED_ABI: ABI = ABI::V1;
/// The newest ABI whose rights we ask for on a best-effort basis.
pub const WANTED_ABI: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error(
        "landlock is not available ({0}): the kernel needs CONFIG_SECURITY_LANDLOCK=y and \
         `landlock` in the active LSM list (CONFIG_LSM or the `lsm=` boot parameter); \
         tapdisk will not serve images without it"
    )]
    Unavailable(String),
    #[error("landlock ruleset: {0}")]
    Ruleset(String),
    #[error("landlock ruleset was not enforced ({0:?})")]
    NotEnforced(RulesetStatus),
}

/// Deny all filesystem access to this thread and its future threads.
pub fn deny_all() -> Result<(), LandlockError> {
    probe()?;
    let err = |e: landlock::RulesetError| LandlockError::Ruleset(e.to_string());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(REQUIRED_ABI))
        .map_err(err)?
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(WANTED_ABI))
        .map_err(err)?
        .handle_access(AccessNet::from_all(WANTED_ABI))
        .map_err(err)?
        .scope(Scope::from_all(WANTED_ABI))
        .map_err(err)?
        .create()
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
        other => Err(LandlockError::NotEnforced(other)),
    }
}

/// The kernel's landlock ABI version, or why there is none.
pub fn probe() -> Result<u32, LandlockError> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute pointer and size 0 and the VERSION flag,
    // landlock_create_ruleset only returns the ABI version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if rc >= 1 {
        return u32::try_from(rc).map_err(|_| LandlockError::Ruleset("odd ABI version".into()));
    }
    let e = std::io::Error::last_os_error();
    Err(LandlockError::Unavailable(match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel was built without it (ENOSYS)".into(),
        Some(libc::EOPNOTSUPP) => "it is built in but disabled at boot (EOPNOTSUPP)".into(),
        _ => e.to_string(),
    }))
}
