//! Step 11b: back to the default scheduler slice before any image data is
//! read.
//!
//! The broker runs its control plane with the shortest scheduler slice (a
//! latency hint, see `tapjail_common::sched`) so that a `create` is not
//! stuck behind busy disks, and a worker inherits it for its exec and
//! confinement. Everything after confinement (parsing the image, serving
//! the tenant's I/O) must compete as an equal: this step sets the default
//! slice again. Threads inherit it, and none exists yet.

pub fn normal() -> std::io::Result<()> {
    tapjail_common::sched::set_slice(0)
}
