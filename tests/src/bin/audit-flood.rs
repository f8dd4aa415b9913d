//! Floods tap-broker with denied requests whose audit lines would be huge
//! (issue 11 item 4): Open frames with a 65,500-byte path of `\x01`,
//! which JSON-escaped is 393 KB.
//!
//! Usage: audit-flood SOCKET MODE COUNT
//! - `stranger`: COUNT connections, each one Hello-less Open frame and
//!   its answer (the broker audits before it answers, so when this exits
//!   every denial is decided and recorded, in full or in a count).
//! - `tenant`: one connection, Hello, then COUNT such Opens, each answered.
//!
//! Prints `sent N`: the requests made (in `stranger` mode, connections:
//! each is exactly one denial, at the connection limit or at its frame).

use std::os::unix::net::UnixStream;
use std::time::Duration;
use tapjail_common::frame::{self, MAX_REPLY_FRAME};
use tapjail_common::proto::{ImageKind, ImageSpec, Reply, Request, PROTOCOL_VERSION};
use tapjail_common::Minor;

fn hostile_open() -> Request {
    Request::Open {
        pid: None,
        minor: Minor::new(0).expect("minor 0"),
        image: ImageSpec {
            kind: ImageKind::Vhd,
            path: "\x01".repeat(65_500),
        },
        read_only: false,
    }
}

fn connect(sock: &str) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(sock), Some(mode), Some(Ok(count))) = (
        args.get(1),
        args.get(2),
        args.get(3).map(|c| c.parse::<u32>()),
    ) else {
        eprintln!("usage: audit-flood SOCKET stranger|tenant COUNT");
        return std::process::ExitCode::from(2);
    };
    let open = hostile_open();
    let mut sent = 0u32;
    match mode.as_str() {
        "stranger" => {
            for _ in 0..count {
                let s = match connect(sock) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("audit-flood: connect: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                };
                // Refused at the connection limit, the broker answers
                // before reading (our write may then fail): one denial
                // either way, and its answer tells us it is recorded.
                sent += 1;
                let _ = frame::send_on(&s, &open, &[]);
                let _ = frame::recv_on::<_, Reply>(&s, MAX_REPLY_FRAME);
            }
        }
        "tenant" => {
            let s = match connect(sock) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("audit-flood: connect: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let hello = Request::Hello {
                version: PROTOCOL_VERSION,
            };
            if frame::send_on(&s, &hello, &[]).is_err()
                || !matches!(
                    frame::recv_on::<_, Reply>(&s, MAX_REPLY_FRAME),
                    Ok((Reply::Hello { .. }, _))
                )
            {
                eprintln!("audit-flood: Hello refused");
                return std::process::ExitCode::FAILURE;
            }
            for _ in 0..count {
                if frame::send_on(&s, &open, &[]).is_err()
                    || frame::recv_on::<_, Reply>(&s, MAX_REPLY_FRAME).is_err()
                {
                    break;
                }
                sent += 1;
            }
        }
        other => {
            eprintln!("audit-flood: unknown mode {other:?}");
            return std::process::ExitCode::from(2);
        }
    }
    println!("sent {sent}");
    std::process::ExitCode::SUCCESS
}
