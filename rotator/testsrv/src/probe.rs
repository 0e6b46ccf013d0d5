//! `dso-testsrv probe HOST:PORT/PATH`: one HTTP GET, the verdict as the exit code.
//!
//! It is the image's HEALTHCHECK and exec probe (a scratch image has no shell, curl or wget),
//! so it is blocking std code: no runtime to start, done in one connect and one read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::config::ProbeConfig;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server answered with this status code.
    Status(u16),
    /// No usable answer: connect refused, timeout, or not HTTP.
    Failed(String),
}

impl Verdict {
    /// Healthy means a 2xx status.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Verdict::Status(200..=299))
    }
}

/// Sends `GET path` to `addr` and reads the status line, all within `timeout`.
pub fn probe(config: &ProbeConfig) -> Verdict {
    let deadline = Instant::now() + config.timeout;
    let mut stream = match TcpStream::connect_timeout(&config.addr, config.timeout) {
        Ok(s) => s,
        Err(e) => return Verdict::Failed(format!("connect {}: {e}", config.addr)),
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(std::time::Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    let request = format!("GET {} HTTP/1.0\r\nHost: {}\r\n\r\n", config.path, config.addr);
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return Verdict::Failed(format!("send to {}: {e}", config.addr));
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Verdict::Failed(format!("read from {}: {e}", config.addr)),
        }
    }
    parse_status(&head).map_or_else(
        || Verdict::Failed(format!("{}: not an HTTP response", config.addr)),
        Verdict::Status,
    )
}

/// The status code from `HTTP/1.x NNN ...`.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"SSH-2.0-x\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn refused_connection_fails() {
        // Bind then drop to find a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = ProbeConfig {
            addr: ([127, 0, 0, 1], port).into(),
            path: "/health".into(),
            timeout: std::time::Duration::from_millis(500),
        };
        assert!(!probe(&config).is_healthy());
    }
}
