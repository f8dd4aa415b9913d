//! The flags XAPI's storage manager adds to tap-ctl's verbs, with blktap's
//! spelling, turned into `tapjail_common::xapi::Options`. A request without
//! any is sent plain; the broker carries out or refuses every one given.

use crate::client::Refused;
use clap::Args;
use std::process::ExitCode;
use tapjail_common::mirror::MirrorRequest;
use tapjail_common::proto::{ErrorKind, Request};
use tapjail_common::xapi::{Options, MAX_TIMEOUT_SECS};
use tapjail_common::Minor;

fn secs() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_TIMEOUT_SECS))
}

/// `-t SECS`, as on every verb SM bounds.
#[derive(Debug, Clone, Default, Args)]
pub struct Timeout {
    /// Fail with "timed out" (exit 110) if the tapdisk has not answered
    /// within SECS; `list` then shows the minor's state.
    #[arg(short = 't', id = "bound_secs", value_name = "SECS", value_parser = secs())]
    pub secs: Option<u32>,
}

/// `open`'s flags beyond `-a` and `-R`.
#[derive(Debug, Clone, Default, Args)]
pub struct OpenFlags {
    #[command(flatten)]
    pub timeout: Timeout,
    /// Open the images without O_DIRECT (through the page cache).
    #[arg(short = 'D')]
    pub no_o_direct: bool,
    /// Share the open parent chain of this minor (same tenant, read-only).
    #[arg(short = 'e', value_name = "MINOR")]
    pub existing_parent: Option<Minor>,
    /// Serve the image as a local read cache of its parent chain (XAPI's
    /// IntelliCache): reads the cache lacks come from the parent and are
    /// written into it; read-only to the guest. The image must lie beneath
    /// the tenant's read_cache_root.
    #[arg(short = 'r')]
    pub read_cache: bool,
    /// Mirror every write to this NBD secondary (nbd:/path/to/socket or
    /// nbd:IPV4:PORT) and copy the existing data over in the background.
    #[arg(short = '2', value_name = "URI")]
    pub secondary: Option<String>,
    /// With -2: standby, blktap's meaning: the secondary is written only
    /// once the primary runs out of space, and then serves the disk.
    #[arg(short = 's', requires = "secondary")]
    pub standby: bool,
    /// Track changed blocks into this blktap CBT log (made by `cbt-util create`).
    #[arg(short = 'C', value_name = "LOG")]
    pub cbt_log: Option<String>,
    /// Read an encryption key (32 or 64 bytes: AES-128/256-XTS) from stdin
    /// and serve blktap's encrypted VHDs with it.
    #[arg(short = 'E')]
    pub encryption: bool,
}

/// `unpause`'s flags beyond `-a`.
#[derive(Debug, Clone, Default, Args)]
pub struct UnpauseFlags {
    #[command(flatten)]
    pub timeout: Timeout,
    /// Serve from this mirror secondary once it is in sync (the minor
    /// mirrors to it), or start mirroring to it (the minor mirrors nothing).
    #[arg(short = '2', value_name = "URI")]
    pub secondary: Option<String>,
    /// Track changed blocks into this blktap CBT log from now on.
    #[arg(short = 'c', value_name = "LOG")]
    pub cbt_log: Option<String>,
    /// Read an encryption key (32 or 64 bytes) from stdin for the image
    /// reopened (e.g. a new -a leaf with another key); kept only if the
    /// reopen succeeds, else the disk stays paused with its old key.
    #[arg(short = 'E')]
    pub encryption: bool,
}

impl OpenFlags {
    pub fn options(self) -> Options {
        Options {
            timeout_secs: self.timeout.secs,
            no_o_direct: self.no_o_direct,
            existing_parent: self.existing_parent,
            cbt_log: self.cbt_log.map(absolute),
            mirror: self.secondary.map(|uri| MirrorRequest {
                uri,
                standby: self.standby,
            }),
            read_cache: self.read_cache,
            ..Options::default()
        }
    }
}

/// Longest key read from stdin: blktap's `MAX_AES_XTS_PLAIN_KEYSIZE / 8`.
const MAX_KEY_READ: u64 = 1024 / 8;

/// `-E`: the key on stdin, all of it, 32 or 64 bytes as blktap takes.
/// The error never holds key bytes.
pub fn read_key(stdin: impl std::io::Read) -> Result<tapjail_common::secret::Secret, String> {
    use std::io::Read;
    let mut key = Vec::with_capacity(MAX_KEY_READ as usize + 1);
    let r = stdin.take(MAX_KEY_READ + 1).read_to_end(&mut key);
    // Wrap first, so the bytes are zeroized on every way out.
    let key = tapjail_common::secret::Secret::new(key);
    r.map_err(|e| format!("-E: reading the encryption key from stdin: {e}"))?;
    if !tapjail_common::secret::KEY_SIZES.contains(&key.len()) {
        return Err(format!(
            "-E: the key on stdin is {}{} bytes; blktap takes 32 (AES-128-XTS) or 64 (AES-256-XTS): \
             pipe exactly the raw key bytes, no newline",
            key.len(),
            if key.len() as u64 > MAX_KEY_READ { "+" } else { "" }
        ));
    }
    Ok(key)
}

/// `opts` with the `-E` key from stdin when `encryption` (open and
/// unpause alike); stdin is not touched otherwise.
pub fn with_key(mut opts: Options, encryption: bool) -> anyhow::Result<Options> {
    if encryption {
        opts.encryption_key = Some(read_key(std::io::stdin().lock()).map_err(anyhow::Error::msg)?);
    }
    Ok(opts)
}

impl UnpauseFlags {
    pub fn options(self) -> Options {
        Options {
            timeout_secs: self.timeout.secs,
            cbt_log: self.cbt_log.map(absolute),
            mirror: self.secondary.map(|uri| MirrorRequest {
                uri,
                standby: false,
            }),
            ..Options::default()
        }
    }
}

/// A log path as the broker needs it: absolute (relative to tap-ctl's
/// working directory otherwise, as blktap's tapdisk would open it).
fn absolute(path: String) -> String {
    if path.starts_with('/') {
        return path;
    }
    match std::env::current_dir() {
        Ok(dir) => dir.join(&path).display().to_string(),
        Err(_) => path,
    }
}

impl Timeout {
    pub fn options(self) -> Options {
        Options {
            timeout_secs: self.secs,
            ..Options::default()
        }
    }
}

/// `req` with `opts`, or plain when there are none.
pub fn wrap(req: Request, opts: Options) -> Request {
    if opts.is_empty() {
        req
    } else {
        Request::WithOptions {
            req: Box::new(req),
            opts,
        }
    }
}

/// How long to wait for the broker: at least a `-t` bound and a little.
pub fn client_wait(req: &Request, wait: std::time::Duration) -> std::time::Duration {
    match req {
        Request::WithOptions {
            opts: Options {
                timeout_secs: Some(s),
                ..
            },
            ..
        } => wait.max(std::time::Duration::from_secs(u64::from(*s) + 30)),
        _ => wait,
    }
}

/// The exit status for an error, blktap-style where SM tells them apart:
/// a feature not built is EOPNOTSUPP (95), a `-t` timeout ETIMEDOUT (110);
/// everything else 1.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<Refused>().map(|r| r.kind) {
        Some(ErrorKind::Unsupported) => ExitCode::from(95),
        Some(ErrorKind::TimedOut) => ExitCode::from(110),
        _ => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::LifecycleCommand;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> LifecycleCommand {
        let cli = Cli::try_parse_from(std::iter::once("tap-ctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Lifecycle(c) => c,
            other => panic!("{other:?}"),
        }
    }

    /// Every argument vector SM's TapCtl builds parses (none is a usage
    /// error), with the meaning SM gives it.
    #[test]
    fn sms_argument_vectors_all_parse() {
        let LifecycleCommand::Close { xapi, force, .. } =
            parse(&["close", "-p", "7", "-m", "1", "-t", "120", "-f"])
        else {
            panic!()
        };
        assert_eq!((xapi.secs, force), (Some(120), true));
        let LifecycleCommand::Open {
            xapi, read_only, ..
        } = parse(&[
            "open",
            "-p",
            "7",
            "-m",
            "1",
            "-a",
            "vhd:/x.vhd",
            "-R",
            "-r",
            "-e",
            "3",
            "-2",
            "nbd:unix:/s",
            "-s",
            "-t",
            "30",
            "-D",
            "-C",
            "/x.log",
            "-E",
        ])
        else {
            panic!()
        };
        assert!(read_only);
        let o = xapi.options();
        assert_eq!(o.timeout_secs, Some(30));
        assert!(o.no_o_direct);
        assert_eq!(o.existing_parent.map(|m| m.get()), Some(3));
        assert!(o.read_cache, "-r");
        assert!(o.unbuilt.is_empty());
        assert_eq!(o.cbt_log.as_deref(), Some("/x.log"));
        assert_eq!(
            o.mirror,
            Some(MirrorRequest {
                uri: "nbd:unix:/s".into(),
                standby: true
            })
        );
        let LifecycleCommand::Unpause { xapi, image, .. } = parse(&[
            "unpause",
            "-p",
            "7",
            "-m",
            "1",
            "-2",
            "nbd:x",
            "-a",
            "vhd:/y.vhd",
            "-c",
            "/y.log",
        ]) else {
            panic!()
        };
        assert!(image.is_some());
        let o = xapi.options();
        assert!(o.unbuilt.is_empty());
        assert_eq!(o.cbt_log.as_deref(), Some("/y.log"));
        assert_eq!(o.mirror.map(|m| m.uri).as_deref(), Some("nbd:x"));
        let LifecycleCommand::Allocate { device, .. } =
            parse(&["allocate", "-d", "/dev/xen/blktap-2/tapdev4"])
        else {
            panic!()
        };
        assert_eq!(device.as_deref(), Some("/dev/xen/blktap-2/tapdev4"));
        assert!(matches!(parse(&["major"]), LifecycleCommand::Major { .. }));
        // The global --timeout stays its own flag.
        let cli = Cli::try_parse_from(["tap-ctl", "--timeout", "5", "close", "-m", "1", "-t", "9"])
            .unwrap();
        assert_eq!(cli.timeout, 5);
    }

    #[test]
    fn key_sizes_are_blktaps_and_errors_hold_no_key() {
        assert_eq!(read_key(&[7u8; 32][..]).unwrap().len(), 32);
        assert_eq!(read_key(&[7u8; 64][..]).unwrap().len(), 64);
        for n in [0, 31, 33, 65, 200] {
            let e = read_key(&vec![b'Q'; n][..]).unwrap_err();
            assert!(e.contains("32") && !e.contains('Q'), "{e}");
        }
    }

    #[test]
    fn plain_requests_stay_plain() {
        let req = Request::Spawn;
        assert_eq!(wrap(req.clone(), Options::default()), req);
        let t = Timeout { secs: Some(3) };
        assert!(matches!(
            wrap(req, t.options()),
            Request::WithOptions { .. }
        ));
    }
}
