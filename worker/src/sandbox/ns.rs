//! Step 5a (before the uid switch, which takes the privilege it needs):
//! new IPC, UTS and network namespaces, where the kernel allows.
//!
//! Defence in depth behind seccomp (which already refuses `socket`): the
//! worker sees no host network interfaces, no host abstract Unix sockets and
//! no host SysV IPC objects. Sockets it was handed keep working; they belong
//! to the namespace they were made in. Unprivileged workers, or hosts that
//! forbid new namespaces, simply keep the host's (best effort, as DESIGN
//! says: "new namespaces where the kernel allows").

/// Enter what we can; returns the namespaces entered.
pub fn isolate() -> Vec<&'static str> {
    let mut entered = Vec::new();
    for (flag, name) in [
        (libc::CLONE_NEWIPC, "ipc"),
        (libc::CLONE_NEWUTS, "uts"),
        (libc::CLONE_NEWNET, "net"),
    ] {
        // SAFETY: unshare takes flags only; the process is single-threaded.
        if unsafe { libc::unshare(flag) } == 0 {
            entered.push(name);
        }
    }
    entered
}
