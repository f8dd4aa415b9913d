//! `tap-ctl metrics --listen ADDR`: the same exposition over HTTP, for a
//! Prometheus server to scrape. It runs here, not in tap-broker: an HTTP
//! request is bytes from the network, and the broker parses no untrusted
//! bytes. Each scrape asks tap-broker afresh with this process's own
//! credentials, so it shows exactly what `tap-ctl metrics` would show
//! the user who started it.
//!
//! Read-only and minimal: one connection at a time, a read and a write
//! timeout, and only the request line is looked at (at most
//! [`MAX_REQUEST_LINE`] bytes; the headers after it are read, bounded, and
//! ignored). `GET /metrics` (or `HEAD`) is answered; anything else gets a
//! 4xx and the connection is closed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Longest request line accepted (`GET /metrics HTTP/1.1` is 22 bytes).
pub const MAX_REQUEST_LINE: usize = 1024;
/// Most header bytes read (and ignored) after the request line.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`; `body` false for `HEAD`.
    Metrics { body: bool },
    /// An answer with this status line and no exposition.
    Refuse(&'static str),
}

/// Decide on one request line (without its CRLF).
pub fn route(line: &[u8]) -> Route {
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Refuse("400 Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Refuse("400 Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Refuse("400 Bad Request");
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Route::Refuse("405 Method Not Allowed"),
    };
    // Prometheus may add a query string; nothing in it is used.
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics { body },
        _ => Route::Refuse("404 Not Found"),
    }
}

/// Read the request head from `s`: the request line, then headers up to
/// the blank line, all bounded in bytes and by `deadline` (a client
/// trickling a byte at a time cannot hold the exporter). `Err` carries
/// the status to answer.
fn read_request_line(
    s: &mut impl Read,
    deadline: std::time::Instant,
) -> Result<Vec<u8>, &'static str> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let mut line_end = None;
    loop {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return Err("400 Bad Request"),
        }
        if std::time::Instant::now() > deadline {
            return Err("408 Request Timeout");
        }
        if line_end.is_none() {
            if head.ends_with(b"\r\n") {
                line_end = Some(head.len() - 2);
            } else if head.len() > MAX_REQUEST_LINE {
                return Err("414 URI Too Long");
            }
        }
        if head.ends_with(b"\r\n\r\n") || (line_end == Some(0)) {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err("431 Request Header Fields Too Large");
        }
    }
    let end = line_end.unwrap_or(0);
    head.truncate(end);
    Ok(head)
}

fn answer(s: &mut TcpStream, status: &str, kind: &str, body: &[u8], send_body: bool) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    if send_body {
        let _ = s.write_all(body);
    }
    let _ = s.flush();
}

/// Serve one connection: read the request, answer, close.
fn serve_one(mut s: TcpStream, socket: &Path, timeout: Duration) {
    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    let line = match read_request_line(&mut s, deadline) {
        Ok(l) => l,
        Err(status) => {
            answer(&mut s, status, "text/plain", status.as_bytes(), true);
            return discard_unread(s);
        }
    };
    match route(&line) {
        Route::Refuse(status) => answer(&mut s, status, "text/plain", status.as_bytes(), true),
        Route::Metrics { body } => {
            let text = crate::client::Client::connect(socket, timeout)
                .and_then(|c| super::collect(&c))
                .map(|d| super::render(&d));
            match text {
                Ok(t) => answer(
                    &mut s,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    t.as_bytes(),
                    body,
                ),
                Err(e) => {
                    let msg = format!("tap-ctl: {}\n", crate::render(&e));
                    answer(
                        &mut s,
                        "503 Service Unavailable",
                        "text/plain",
                        msg.as_bytes(),
                        body,
                    )
                }
            }
        }
    }
}

/// Close after a refused request without resetting the connection: what
/// the client sent beyond what was read (already here) is read and
/// dropped first, without waiting for more, and at most [`MAX_HEAD`].
fn discard_unread(mut s: TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    if s.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left = MAX_HEAD;
    while left > 0 {
        match s.read(&mut sink) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Listen on `addr` and answer scrapes until killed. Says where it
/// listens on stderr (the port, if 0 was asked for).
pub fn run(addr: &str, socket: &Path, timeout: Duration) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e}; give a free local address such as \
             127.0.0.1:9477 (a port below 1024 needs root)"
        )
    })?;
    let at = l.local_addr()?;
    eprintln!("tap-ctl: serving metrics on http://{at}/metrics");
    for conn in l.incoming() {
        match conn {
            Ok(s) => serve_one(s, socket, timeout),
            // A client that went away before accept: nothing to answer.
            Err(_) => continue,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_or_head_of_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1"),
            Route::Metrics { body: true }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0"),
            Route::Metrics { body: false }
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1"),
            Route::Refuse("405 Method Not Allowed")
        );
        assert_eq!(route(b"GET / HTTP/1.1"), Route::Refuse("404 Not Found"));
        for bad in [
            &b"GET /metrics"[..],
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics SPDY/3",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(route(bad), Route::Refuse("400 Bad Request"), "{bad:?}");
        }
    }

    #[test]
    fn request_head_is_bounded() {
        let later = || std::time::Instant::now() + CLIENT_TIMEOUT;
        let long = [b'A'; MAX_REQUEST_LINE + 10];
        assert_eq!(
            read_request_line(&mut &long[..], later()),
            Err("414 URI Too Long")
        );
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        many.extend("X-A: b\r\n".repeat(4000).bytes());
        assert_eq!(
            read_request_line(&mut &many[..], later()),
            Err("431 Request Header Fields Too Large")
        );
        // The stream ending early is a bad request, not a hang or panic.
        assert_eq!(
            read_request_line(&mut &b"GET /metrics HTTP/1.1\r\nHost: x"[..], later()),
            Err("400 Bad Request")
        );
        assert_eq!(
            read_request_line(
                &mut &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                later()
            ),
            Ok(b"GET /metrics HTTP/1.1".to_vec())
        );
    }

    #[test]
    fn request_head_past_its_deadline_is_refused() {
        let past = std::time::Instant::now() - Duration::from_secs(1);
        assert_eq!(
            read_request_line(&mut &b"GET /metrics HTTP/1.1\r\n\r\n"[..], past),
            Err("408 Request Timeout")
        );
    }
}
