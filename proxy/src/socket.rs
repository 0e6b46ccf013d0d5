//! Socket options, kept in one place so `socket2` stays at the edge of the crate.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Creates a listening socket on exactly `addr` (an IPv6 address never also takes IPv4),
/// with SO_REUSEADDR so an agent restart does not wait out TIME_WAIT.
///
/// TCP_NODELAY and keepalive are set here, once: Linux copies them to every accepted
/// socket, which saves four system calls per connection on the accept path.
pub(crate) fn listen(addr: SocketAddr, backlog: u32, keepalive: Option<Duration>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        socket.set_tcp_keepalive(&keepalive_params(idle))?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Accepts one connection from a listening socket polled through `AsyncFd`. The socket
/// returned is non-blocking and close-on-exec (accept4(2) sets both, no further system
/// call) and not registered with any reactor yet.
pub(crate) async fn accept(
    listener: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|l| accept_nonblocking(l.get_ref())) {
            Ok(r) => return r,
            // Nothing to accept after all: readiness was cleared, wait again.
            Err(_would_block) => continue,
        }
    }
}

#[cfg(target_os = "linux")]
fn accept_nonblocking(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, addr) =
        SockRef::from(listener).accept4(nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC)?;
    let addr = addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "accepted a socket without an IP address",
        )
    })?;
    Ok((socket.into(), addr))
}

#[cfg(not(target_os = "linux"))]
fn accept_nonblocking(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (stream, addr) = listener.accept()?;
    stream.set_nonblocking(true)?;
    Ok((stream, addr))
}

/// Whether `addr` can be bound now, as [`listen`] would bind it (SO_REUSEADDR, IPv6
/// only): binds a socket without listening on it, then closes it. A config reload checks
/// its new addresses with this before it changes anything.
pub(crate) fn probe(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())
}

/// TCP keepalive for a dialed socket (which got TCP_NODELAY before connecting). Both legs
/// of a connection have TCP_NODELAY, so the proxy adds no Nagle delay to small database
/// packets, and the configured keepalive.
pub(crate) fn set_keepalive(stream: &TcpStream, keepalive: Option<Duration>) -> io::Result<()> {
    if let Some(idle) = keepalive {
        SockRef::from(stream).set_tcp_keepalive(&keepalive_params(idle))?;
    }
    Ok(())
}

fn keepalive_params(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
}

/// Connects to `addr` with TCP_NODELAY set before the handshake.
pub(crate) async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

/// Sends FIN on `stream` while leaving its read side open (half-close).
pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match SockRef::from(stream).shutdown(Shutdown::Write) {
        // The peer is already gone; nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Makes the next close of `stream` send RST instead of FIN. Used when the proxy has to
/// tell a client that its backend broke mid-stream, so the client does not mistake a
/// truncated reply for a complete one.
pub(crate) fn set_linger_zero(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let idle = Duration::from_secs(77);
        let l = listen("127.0.0.1:0".parse().unwrap(), 16, Some(idle)).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        assert!(a.nodelay().unwrap());
        let s = SockRef::from(&a);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), idle);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
    }
}
