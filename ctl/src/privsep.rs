//! `tap-ctl vhd` in two processes: a confined child parses the images, the
//! unconfined parent opens files for it (OpenSSH privsep, as `tapdisk`
//! standalone mode and the broker do for workers).
//!
//! The parent never reads image bytes. It answers the child's requests
//! (`Ask`) from a [`Grant`] made from the command line before the fork:
//! the named files in the named modes, the one new output file, and
//! parents of layers it has handed out, found under the locator rule of
//! [`crate::files`] or named with `--parent`. A child taken over by a
//! hostile image can therefore get nothing the command line and the rule
//! would not have given it anyway.

use crate::confine;
use crate::files::{self, Paths};
use crate::sys::{self, Exit, Forked};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use tapjail_common::frame::{self, MAX_REQUEST_FRAME};
use tapjail_image::{ImageError, ParentLocator};

/// Most requests one run may make: a chain is opened a few times over
/// (check opens it twice), each layer trying a few locators.
const MAX_ASKS: usize = 4096;

/// What the command line allows the child to have.
#[derive(Debug, Default, Clone)]
pub struct Grant {
    /// Files named on the command line, and whether they may be written.
    pub open: Vec<(PathBuf, bool)>,
    /// The one new file the command creates.
    pub create: Option<PathBuf>,
    /// `--parent`: (leaf, its parent).
    pub named_parent: Option<(PathBuf, PathBuf)>,
    /// Whether the leaf's parent may be opened writable (coalesce).
    pub parent_writable: bool,
}

/// A locator as it crosses the socket.
#[derive(Debug, Serialize, Deserialize)]
struct Loc {
    code: String,
    path: String,
    relative: bool,
}

/// The child's requests.
#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    Open {
        path: Vec<u8>,
        write: bool,
    },
    Create {
        path: Vec<u8>,
    },
    Remove {
        path: Vec<u8>,
    },
    NamedParent {
        child: String,
        write: bool,
    },
    Locate {
        child: String,
        loc: Loc,
        write: bool,
    },
}

/// The parent's answers. `File` comes with the fd.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    File { name: String },
    Done,
    NotNamed,
    Failed(WireError),
}

/// An [`ImageError`] as it crosses the socket.
#[derive(Debug, Serialize, Deserialize)]
enum WireError {
    Io { create: bool, errno: i32 },
    Invalid(String),
    Parent(String),
    Other(String),
}

impl From<ImageError> for WireError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Io { op, source, .. } if source.raw_os_error().is_some() => WireError::Io {
                create: op == "create",
                errno: source.raw_os_error().unwrap_or(libc::EIO),
            },
            ImageError::InvalidArgument(m) => WireError::Invalid(m),
            ImageError::Parent(m) => WireError::Parent(m),
            other => WireError::Other(other.to_string()),
        }
    }
}

impl From<WireError> for ImageError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io { create, errno } => ImageError::Io {
                op: if create { "create" } else { "open" },
                offset: 0,
                source: std::io::Error::from_raw_os_error(errno),
            },
            WireError::Invalid(m) => ImageError::InvalidArgument(m),
            WireError::Parent(m) => ImageError::Parent(m),
            WireError::Other(m) => ImageError::Unsupported(m),
        }
    }
}

fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(b.to_vec()))
}

/// Privilege separation could not be set up or the child died.
#[derive(Debug, thiserror::Error)]
pub enum PrivsepError {
    #[error("cannot make the socket to the confined image parser: {0}")]
    Socket(std::io::Error),
    #[error("cannot fork the confined image parser: {0}")]
    Fork(std::io::Error),
    #[error("cannot wait for the confined image parser: {0}")]
    Wait(std::io::Error),
    #[error("the confined image parser was killed by signal {0}{why}", why = sigsys_note(*.0))]
    Killed(i32),
    #[error("the confined image parser broke the protocol: {0}")]
    Protocol(String),
}

fn sigsys_note(sig: i32) -> &'static str {
    if sig == libc::SIGSYS {
        " (a system call outside its seccomp filter)"
    } else {
        ""
    }
}

/// Run `body` in a confined child with files from `grant`; returns the
/// child's exit code. Call while the process has one thread. In the child,
/// `body`'s code becomes the exit status (this function does not return
/// there); a failed confinement is reported and exits with 1.
pub fn run_confined(
    grant: Grant,
    body: impl FnOnce(&mut Remote) -> i32,
) -> Result<i32, PrivsepError> {
    let (ours, theirs) = UnixStream::pair().map_err(PrivsepError::Socket)?;
    match sys::fork().map_err(PrivsepError::Fork)? {
        Forked::Child => {
            drop(ours);
            let confined = sys::close_stray_fds(theirs.as_raw_fd())
                .map_err(|e| format!("cannot close inherited file descriptors: {e}"))
                .and_then(|()| confine::confine().map_err(|e| e.to_string()));
            let code = match confined {
                Ok(_) => body(&mut Remote { sock: theirs }),
                Err(e) => {
                    eprintln!("tap-ctl: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
        Forked::Parent(pid) => {
            drop(theirs);
            let served = Server::new(grant).serve(&ours);
            drop(ours);
            let exit = sys::wait(pid).map_err(PrivsepError::Wait)?;
            served?;
            match exit {
                Exit::Code(c) => Ok(c),
                Exit::Signal(s) => Err(PrivsepError::Killed(s)),
            }
        }
    }
}

/// The child's side: each [`Paths`] call is one request to the parent.
#[derive(Debug)]
pub struct Remote {
    sock: UnixStream,
}

impl Remote {
    fn ask(&mut self, ask: &Ask) -> Result<(Answer, Option<OwnedFd>), ImageError> {
        let lost = |e: frame::FrameError| {
            ImageError::Unsupported(format!("lost the unconfined tap-ctl process: {e}"))
        };
        frame::send(self.sock.as_fd(), ask, &[]).map_err(lost)?;
        let (answer, mut fds) =
            frame::recv::<Answer>(self.sock.as_fd(), MAX_REQUEST_FRAME).map_err(lost)?;
        Ok((answer, fds.pop()))
    }

    fn file(&mut self, ask: &Ask) -> Result<(File, String), ImageError> {
        match self.ask(ask)? {
            (Answer::File { name }, Some(fd)) => Ok((File::from(fd), name)),
            (Answer::Failed(e), _) => Err(e.into()),
            (other, _) => Err(ImageError::Unsupported(format!(
                "unexpected answer from the unconfined tap-ctl process: {other:?}"
            ))),
        }
    }
}

impl Paths for Remote {
    fn open(&mut self, path: &Path, write: bool) -> Result<File, ImageError> {
        let path = path.as_os_str().as_bytes().to_vec();
        self.file(&Ask::Open { path, write }).map(|(f, _)| f)
    }

    fn create(&mut self, path: &Path) -> Result<File, ImageError> {
        let path = path.as_os_str().as_bytes().to_vec();
        self.file(&Ask::Create { path }).map(|(f, _)| f)
    }

    fn remove(&mut self, path: &Path) {
        let path = path.as_os_str().as_bytes().to_vec();
        let _ = self.ask(&Ask::Remove { path });
    }

    fn named_parent(
        &mut self,
        child: &str,
        write: bool,
    ) -> Option<Result<(File, String), ImageError>> {
        let ask = Ask::NamedParent {
            child: child.to_string(),
            write,
        };
        match self.ask(&ask) {
            Ok((Answer::NotNamed, _)) => None,
            Ok((Answer::File { name }, Some(fd))) => Some(Ok((File::from(fd), name))),
            Ok((Answer::Failed(e), _)) => Some(Err(e.into())),
            Ok((other, _)) => Some(Err(ImageError::Unsupported(format!(
                "unexpected answer from the unconfined tap-ctl process: {other:?}"
            )))),
            Err(e) => Some(Err(e)),
        }
    }

    fn locate(
        &mut self,
        child: &str,
        locator: &ParentLocator,
        write: bool,
    ) -> Result<(File, String), ImageError> {
        self.file(&Ask::Locate {
            child: child.to_string(),
            loc: Loc {
                code: locator.code.clone(),
                path: locator.path.clone(),
                relative: locator.relative,
            },
            write,
        })
    }
}

/// The parent's side: answers requests within the grant.
#[derive(Debug)]
struct Server {
    grant: Grant,
    /// Layers handed out, with their pinned directories: only their
    /// parents may be looked for, and only there.
    dirs: files::Dirs,
    created: Option<PathBuf>,
}

impl Server {
    fn new(grant: Grant) -> Self {
        Server {
            grant,
            dirs: files::Dirs::default(),
            created: None,
        }
    }

    /// Answer until the child closes its end.
    fn serve(&mut self, sock: &UnixStream) -> Result<(), PrivsepError> {
        for _ in 0..MAX_ASKS {
            let ask = match frame::recv::<Ask>(sock.as_fd(), MAX_REQUEST_FRAME) {
                Ok((ask, fds)) if fds.is_empty() => ask,
                Ok(_) => return Err(PrivsepError::Protocol("it sent a file descriptor".into())),
                Err(frame::FrameError::Closed) => return Ok(()),
                Err(e) => return Err(PrivsepError::Protocol(e.to_string())),
            };
            let (answer, file) = match self.answer(ask) {
                Ok(Some((f, name))) => (Answer::File { name }, Some(f)),
                Ok(None) => (Answer::Done, None),
                Err(Refusal::NotNamed) => (Answer::NotNamed, None),
                Err(Refusal::Failed(e)) => (Answer::Failed(e.into()), None),
            };
            let fds: Vec<_> = file.iter().map(|f| f.as_fd()).collect();
            if frame::send(sock.as_fd(), &answer, &fds).is_err() {
                // The child is gone; its exit status says why.
                return Ok(());
            }
        }
        Err(PrivsepError::Protocol(format!(
            "more than {MAX_ASKS} requests for files"
        )))
    }

    fn answer(&mut self, ask: Ask) -> Result<Option<(File, String)>, Refusal> {
        let not_granted = |what: String| {
            Refusal::Failed(ImageError::InvalidArgument(format!(
                "{what} was not named on the command line; the image parser may open \
                 nothing else"
            )))
        };
        match ask {
            Ask::Open { path, write } => {
                let path = path_of(&path);
                if !self
                    .grant
                    .open
                    .iter()
                    .any(|(p, w)| *p == path && (*w || !write))
                {
                    return Err(not_granted(path.display().to_string()));
                }
                let (f, dir) = files::open_named(&path, write)?;
                let name = path.to_string_lossy().into_owned();
                self.dirs.insert(&name, dir);
                Ok(Some((f, name)))
            }
            Ask::Create { path } => {
                let path = path_of(&path);
                if self.grant.create.as_ref() != Some(&path) || self.created.is_some() {
                    return Err(not_granted(format!("creating {}", path.display())));
                }
                let f = files::create_new_file(&path)?;
                self.created = Some(path.clone());
                Ok(Some((f, path.to_string_lossy().into_owned())))
            }
            Ask::Remove { path } => {
                let path = path_of(&path);
                if self.created.as_ref() == Some(&path) {
                    let _ = std::fs::remove_file(&path);
                    self.created = None;
                }
                Ok(None)
            }
            Ask::NamedParent { child, write } => {
                self.may_look_for_parent_of(&child, write)?;
                let Some((_, parent)) = self
                    .grant
                    .named_parent
                    .as_ref()
                    .filter(|(leaf, _)| *leaf.to_string_lossy() == *child)
                else {
                    return Err(Refusal::NotNamed);
                };
                let (f, dir) = files::open_named(parent, write)?;
                let name = parent.to_string_lossy().into_owned();
                self.dirs.insert(&name, dir);
                Ok(Some((f, name)))
            }
            Ask::Locate { child, loc, write } => {
                self.may_look_for_parent_of(&child, write)?;
                let loc = ParentLocator {
                    code: loc.code,
                    path: loc.path,
                    relative: loc.relative,
                };
                let dir = self.dirs.get(&child).ok_or_else(|| {
                    Refusal::Failed(ImageError::Parent(format!(
                        "{child} was not opened by this tool: its parent is not looked for"
                    )))
                })?;
                let dir_name = Path::new(&child)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty());
                let (f, name, pdir) = files::locate_beneath(dir, dir_name, &loc, write)?;
                self.dirs.insert(&name, pdir);
                Ok(Some((f, name)))
            }
        }
    }

    /// Parents are looked for only for layers handed out, and writable
    /// only for the leaf's own parent when the command merges into it.
    fn may_look_for_parent_of(&self, child: &str, write: bool) -> Result<(), Refusal> {
        if self.dirs.get(child).is_none() {
            return Err(Refusal::Failed(ImageError::Parent(format!(
                "{child} was not opened by this tool: its parent is not looked for"
            ))));
        }
        let is_leaf = self
            .grant
            .open
            .iter()
            .any(|(p, _)| *p.to_string_lossy() == *child);
        if write && !(self.grant.parent_writable && is_leaf) {
            return Err(Refusal::Failed(ImageError::InvalidArgument(format!(
                "the parent of {child} may only be read"
            ))));
        }
        Ok(())
    }
}

/// Why a request got no file.
#[derive(Debug)]
enum Refusal {
    NotNamed,
    Failed(ImageError),
}

impl From<ImageError> for Refusal {
    fn from(e: ImageError) -> Self {
        Refusal::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(r: Result<Option<(File, String)>, Refusal>) -> String {
        match r {
            Err(Refusal::Failed(e)) => e.to_string(),
            Err(Refusal::NotNamed) => "not named".into(),
            Ok(_) => panic!("granted"),
        }
    }

    fn bytes(p: &Path) -> Vec<u8> {
        p.as_os_str().as_bytes().to_vec()
    }

    #[test]
    fn privsep_server_gives_only_what_the_command_line_named() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("a.img");
        let other = tmp.path().join("b.img");
        let base = tmp.path().join("base.img");
        for p in [&img, &other, &base] {
            std::fs::write(p, [0u8; 512]).unwrap();
        }
        let out = tmp.path().join("out.img");
        let mut srv = Server::new(Grant {
            open: vec![(img.clone(), false)],
            create: Some(out.clone()),
            ..Grant::default()
        });
        let loc = |path: &str| Loc {
            code: "W2ru".into(),
            path: path.into(),
            relative: true,
        };
        let leaf = img.to_string_lossy().into_owned();
        // A parent is looked for only for a layer handed out.
        let e = refusal(srv.answer(Ask::Locate {
            child: leaf.clone(),
            loc: loc("./base.img"),
            write: false,
        }));
        assert!(e.contains("not opened by this tool"), "{e}");
        let e = refusal(srv.answer(Ask::Open {
            path: bytes(&other),
            write: false,
        }));
        assert!(e.contains("was not named on the command line"), "{e}");
        let e = refusal(srv.answer(Ask::Open {
            path: bytes(&img),
            write: true,
        }));
        assert!(e.contains("was not named on the command line"), "{e}");
        assert!(srv
            .answer(Ask::Open {
                path: bytes(&img),
                write: false,
            })
            .unwrap()
            .is_some());
        // Now its parent may be found, read-only only (not a coalesce).
        let e = refusal(srv.answer(Ask::Locate {
            child: leaf.clone(),
            loc: loc("./base.img"),
            write: true,
        }));
        assert!(e.contains("may only be read"), "{e}");
        let (_, name) = srv
            .answer(Ask::Locate {
                child: leaf.clone(),
                loc: loc("./base.img"),
                write: false,
            })
            .unwrap()
            .unwrap();
        assert_eq!(Path::new(&name), base);
        assert_eq!(
            refusal(srv.answer(Ask::NamedParent {
                child: leaf,
                write: false
            })),
            "not named"
        );
        // One new file, the named one; only it may be removed.
        let e = refusal(srv.answer(Ask::Create {
            path: bytes(&other),
        }));
        assert!(e.contains("creating"), "{e}");
        srv.answer(Ask::Create { path: bytes(&out) }).unwrap();
        assert!(refusal(srv.answer(Ask::Create { path: bytes(&out) })).contains("creating"));
        srv.answer(Ask::Remove {
            path: bytes(&other),
        })
        .unwrap();
        assert!(other.exists());
        srv.answer(Ask::Remove { path: bytes(&out) }).unwrap();
        assert!(!out.exists());
    }
}
