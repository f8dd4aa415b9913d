//! Talking to tap-broker: connect, `Hello`, one request, one reply.

use anyhow::Context;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use tapjail_common::frame::{self, MAX_REPLY_FRAME};
use tapjail_common::proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};

/// The broker refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

/// How long to wait for the broker (opening a long chain can take a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach tap-broker at {} (is it running? use --socket or TAPJAIL_SOCKET)",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let client = Client { stream };
        match client.call(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Reply::Hello { .. } => Ok(client),
            other => anyhow::bail!("tap-broker answered Hello with {other:?}"),
        }
    }

    /// Send `req`; a `Reply::Error` becomes a [`Refused`] error.
    pub fn call(&self, req: &Request) -> anyhow::Result<Reply> {
        frame::send_on(&self.stream, req, &[]).context("sending to tap-broker")?;
        let (reply, fds): (Reply, _) =
            frame::recv_on(&self.stream, MAX_REPLY_FRAME).context("reading tap-broker's reply")?;
        drop(fds);
        match reply {
            Reply::Error { kind, message } => Err(Refused { kind, message }.into()),
            r => Ok(r),
        }
    }
}
