//! The systemd notification protocol (`sd_notify(3)`), for `Type=notify` units: one
//! datagram of `KEY=VALUE` lines to the Unix datagram socket named by `$NOTIFY_SOCKET`.
//!
//! A name that starts with `@` is an abstract socket (the `@` stands for the leading NUL
//! byte); anything else is a filesystem path. Without `$NOTIFY_SOCKET` (not started by
//! systemd, or by a unit of another type) every call is a no-op. Written with std alone: the
//! protocol is one `sendto`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for a `Type=notify` service.
pub const ENV: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` assignments, like `READY=1\nSTATUS=...`) to
/// `$NOTIFY_SOCKET`. `Ok(false)` when the variable is unset or empty: nobody listens.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(ENV) {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket` (a path, or `@name` for an abstract
/// socket).
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = address(socket)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "sent {sent} of {} bytes to {}",
                state.len(),
                socket.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

/// `READY=1` with a status line and this process's pid, for the moment the service works.
pub fn ready_message(status: &str) -> String {
    format!(
        "READY=1\nSTATUS={}\nMAINPID={}",
        one_line(status),
        std::process::id()
    )
}

/// `STOPPING=1` with a status line, for the moment shutdown starts.
pub fn stopping_message(status: &str) -> String {
    format!("STOPPING=1\nSTATUS={}", one_line(status))
}

/// A status value cannot hold a newline (it would start another assignment).
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn address(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{ENV}={:?} is neither an absolute path nor an abstract name (@...)",
                socket.to_string_lossy()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;
    use std::time::Duration;

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), &ready_message("serving 2 listeners")).unwrap();
        let got = receive(&sock);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines[0], "READY=1");
        assert_eq!(lines[1], "STATUS=serving 2 listeners");
        assert_eq!(lines[2], format!("MAINPID={}", std::process::id()));
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("dso-sdnotify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(
            OsStr::new(&format!("@{name}")),
            &stopping_message("draining\nnow"),
        )
        .unwrap();
        assert_eq!(receive(&sock), "STOPPING=1\nSTATUS=draining now");
    }

    #[test]
    fn a_relative_name_is_refused_and_a_missing_socket_is_an_error() {
        let e = notify_to(OsStr::new("relative/notify"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody");
        assert!(notify_to(missing.as_os_str(), "READY=1").is_err());
    }
}
