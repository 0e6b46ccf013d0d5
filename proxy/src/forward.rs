//! Moving bytes between the two legs of a connection.
//!
//! Each direction reads into a buffer that exists only while data flows: it is allocated
//! (uninitialized, so no memset) when the socket becomes readable and released when the
//! socket has nothing more to give. An idle connection pins no buffer.
//! End of stream on one side is passed on as a half-close (FIN) to the other, and the
//! opposite direction keeps flowing until it ends too.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::listener::Shared;
use crate::route::{BackendState, Generation};
use crate::socket;
use crate::stats::Counters;

/// Bytes read per system call.
const BUFFER: usize = 64 * 1024;

/// Why forwarding stopped.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Both directions reached end of stream.
    Done,
    /// A read or write failed (reset, broken pipe).
    Broken(io::Error),
    /// The generation's drain deadline passed.
    Forced,
    /// The proxy is shutting down hard.
    Killed,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Forwards until both directions end, or the connection is closed by the proxy.
pub(crate) async fn run(
    shared: &Shared,
    backend: &BackendState,
    generation: &Generation,
    client: &TcpStream,
    server: &TcpStream,
    jitter: Duration,
) -> Ended {
    let last = AtomicU64::new(0);
    let epoch = Instant::now();
    let up = pump(
        client,
        server,
        [&shared.counters.bytes_in, &backend.counters.bytes_in],
        &last,
        epoch,
    );
    let down = pump(
        server,
        client,
        [&shared.counters.bytes_out, &backend.counters.bytes_out],
        &last,
        epoch,
    );
    let forced = async {
        generation.force.cancelled().await;
        tokio::time::sleep(jitter).await;
    };
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => Ended::Done,
            Err(e) => Ended::Broken(e),
        },
        () = forced => Ended::Forced,
        () = shared.kill.cancelled() => Ended::Killed,
        () = idle(shared.cfg.idle_timeout, &last, epoch) => Ended::Idle,
    }
}

/// Copies `from` to `to` until end of stream, then half-closes `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counters: [&AtomicU64; 2],
    last: &AtomicU64,
    epoch: Instant,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(BUFFER);
        }
        buf.clear();
        match from.try_read_buf(&mut buf) {
            Ok(0) => {
                socket::shutdown_write(to)?;
                return Ok(());
            }
            Ok(n) => {
                write_all(to, &buf[..n]).await?;
                for c in counters {
                    Counters::add(c, n as u64);
                }
                last.store(millis(epoch), Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained for now: do not pin the buffer while the peer is quiet.
                buf = Vec::new();
            }
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Resolves once nothing has moved for `timeout`; never when `timeout` is `None`.
async fn idle(timeout: Option<Duration>, last: &AtomicU64, epoch: Instant) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last_ms = last.load(Ordering::Relaxed);
        let deadline = epoch + Duration::from_millis(last_ms) + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
