//! Socket options, kept in one place so `socket2` stays at the edge of the crate.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Creates a listening socket on exactly `addr` (an IPv6 address never also takes IPv4),
/// with SO_REUSEADDR so an agent restart does not wait out TIME_WAIT.
pub(crate) fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Applies the options every proxied leg gets: TCP_NODELAY (the proxy must not add Nagle
/// delay to small database packets) and, when configured, TCP keepalive.
pub(crate) fn tune(stream: &TcpStream, keepalive: Option<Duration>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(idle) = keepalive {
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10));
        SockRef::from(stream).set_tcp_keepalive(&ka)?;
    }
    Ok(())
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
