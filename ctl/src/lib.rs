//! The offline tools' machinery, a library so that other crates' tests
//! can use the file helpers: [`files`] (opening images by path, the
//! parent-locator rule), [`privsep`] (a confined child parses, the parent
//! opens), [`confine`] (landlock + seccomp without the worker's crates),
//! and [`sys`] (the raw system calls, wrapped once).

pub mod confine;
pub mod files;
pub mod privsep;
pub mod raw_parent;
pub mod sys;
