//! One client connection: wait out a hold, route, dial with retry, then forward.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::forward::{self, Ended};
use crate::listener::{Listener, Shared};
use crate::route::{BackendState, Generation, GenerationGuard, Mode, Route};
use crate::socket;
use crate::stats::Counters;

/// Serves a socket just accepted (not yet registered with any runtime) on the runtime that
/// polls this future: registers it, then [`serve`]s it.
pub(crate) async fn start(
    shared: Arc<Shared>,
    client: std::net::TcpStream,
    peer: SocketAddr,
    permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
) {
    match TcpStream::from_std(client) {
        Ok(client) => serve(shared, client, peer, permits).await,
        Err(e) => {
            Counters::add(&shared.counters.failed, 1);
            warn!(listener = %shared.cfg.name, peer = %peer, error = %e, "cannot register an accepted connection; closing it");
        }
    }
}

/// Serves one accepted client until both sides are done. The permits are the connection
/// limit slots it occupies; they are released when it returns.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    _permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
) {
    // TCP_NODELAY and keepalive came with the accepted socket (see socket::listen).
    let (guard, backend, server) = match route(&shared, peer).await {
        Routed::Ready(guard, backend, server) => (guard, backend, server),
        Routed::HoldExpired => {
            // Boxed: its 4 KiB read buffer would otherwise sit in every connection's
            // future, idle or not (the task's size is that of its largest state).
            Box::pin(close_cleanly(&client)).await;
            return;
        }
        Routed::Failed => {
            // Same reason as above: the client learns with FIN that it was not served.
            Box::pin(close_cleanly(&client)).await;
            return;
        }
        Routed::Killed => return,
    };
    let generation = guard.generation();
    let c = &shared.counters;
    let b = &backend.counters;
    // Spread forced closes over the close window by a per-connection offset.
    let jitter = spread(peer, shared.settings().close_window);
    let ended = {
        let _active = Gauge::new(&c.active, &b.active);
        forward::run(&shared, &backend, generation, &client, &server, jitter).await
    };
    match ended {
        Ended::Done => {}
        Ended::Broken(e) => {
            debug!(listener = %shared.cfg.name, peer = %peer, backend = %backend.backend.addr, error = %e, "connection broken");
            // Tell the healthy side with a reset, so it does not take a truncated stream
            // for a complete one.
            socket::set_linger_zero(&client);
            socket::set_linger_zero(&server);
        }
        Ended::Forced => {
            generation.forced.fetch_add(1, Ordering::Relaxed);
            Counters::add(&c.forced_closes, 1);
            Counters::add(&b.forced_closes, 1);
        }
        Ended::Killed => {
            Counters::add(&c.forced_closes, 1);
            Counters::add(&b.forced_closes, 1);
        }
        Ended::Idle => {
            Counters::add(&c.idle_timeouts, 1);
            Counters::add(&b.idle_timeouts, 1);
        }
    }
}

/// Counts a connection as active on its listener and backend until dropped, whatever way
/// forwarding ends (including a panic or the task being dropped).
struct Gauge<'a>([&'a AtomicU64; 2]);

impl<'a> Gauge<'a> {
    fn new(listener: &'a AtomicU64, backend: &'a AtomicU64) -> Self {
        Counters::add(listener, 1);
        Counters::add(backend, 1);
        Gauge([listener, backend])
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        for g in self.0 {
            Counters::sub(g, 1);
        }
    }
}

/// Counts a connection as held while it waits for a route.
struct Held<'a>(&'a Counters);

impl<'a> Held<'a> {
    fn new(c: &'a Counters) -> Self {
        Counters::add(&c.held, 1);
        Held(c)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        Counters::sub(&self.0.held, 1);
    }
}

/// Where routing a connection ended.
enum Routed {
    /// Dialed: forward through this backend, counted in the guard's generation.
    Ready(GenerationGuard, Arc<BackendState>, TcpStream),
    /// The hold ran past its maximum; the client is closed cleanly.
    HoldExpired,
    /// No backend could be dialed within the budget, the route has none, or the listener
    /// stopped while the connection was held; the client is closed cleanly.
    Failed,
    /// The proxy is closing every connection now.
    Killed,
}

/// Closes a client that never reached a backend with FIN rather than RST: shuts down our
/// write side, then reads and discards what the client had sent (a Postgres startup
/// packet, say) until it closes too, for at most a moment. Closing a socket with unread
/// data in it would send RST.
async fn close_cleanly(client: &TcpStream) {
    if socket::shutdown_write(client).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let drain = async {
        loop {
            if client.readable().await.is_err() {
                return;
            }
            match client.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// Finds the connection a backend: waits while the listener holds, takes a generation
/// guard, dials, and retries on another backend (re-reading the route) while no byte has
/// been forwarded and the budget allows.
async fn route(shared: &Shared, peer: SocketAddr) -> Routed {
    let cfg = shared.settings();
    let c = &shared.counters;
    let mut held: Option<Held<'_>> = None;
    let mut attempts = 0u32;
    let mut started: Option<Instant> = None;
    loop {
        let route = shared.route.load_full();
        if let Mode::Hold(hold) = &route.mode {
            held.get_or_insert_with(|| Held::new(c));
            // Time spent held is not dial time: the budget starts again after the hold.
            attempts = 0;
            started = None;
            let mut changed = shared.changed.subscribe();
            // A store between our load and the subscription would otherwise be missed.
            if !Arc::ptr_eq(&shared.route.load(), &route) {
                continue;
            }
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(hold.until) => {}
                () = shared.stop.cancelled() => {
                    // Shutting down while paused: nothing will resume this listener.
                    Counters::add(&c.failed, 1);
                    debug!(listener = %cfg.name, peer = %peer, "listener stopped while the connection was held");
                    return Routed::Failed;
                }
                () = shared.kill.cancelled() => return Routed::Killed,
            }
            // A later pause replaces this hold with a new clock; only the hold that is
            // still in force (or one marked expired) closes the connection.
            let still_in_force = matches!(&shared.route.load().mode, Mode::Hold(h) if Arc::ptr_eq(h, hold));
            if hold.expired.load(Ordering::SeqCst) || (still_in_force && Instant::now() >= hold.until) {
                Counters::add(&c.hold_timeouts, 1);
                debug!(listener = %cfg.name, peer = %peer, "hold expired; closing held connection");
                return Routed::HoldExpired;
            }
            continue;
        }
        drop(held.take());

        let generation = &route.generation;
        let (guard, backend) = match enter(shared, &route) {
            Entered::Ready(guard, backend) => (guard, backend),
            Entered::Changed => continue,
            Entered::NoBackend => {
                Counters::add(&c.failed, 1);
                warn!(listener = %cfg.name, peer = %peer, generation = generation.id, "route has no backend; closing connection");
                return Routed::Failed;
            }
        };
        let start = *started.get_or_insert_with(Instant::now);
        let addr = backend.backend.addr;
        // One dial may take `connect_timeout`, but never past what is left of the budget.
        let limit = cfg
            .connect_timeout
            .min(cfg.dial_budget.saturating_sub(start.elapsed()));
        let dial = tokio::time::timeout(limit, socket::connect(addr));
        let dialed = tokio::select! {
            r = dial => match r {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            },
            // The generation passed its drain deadline while we dialed: nothing has been
            // forwarded, so go to the current route instead.
            () = generation.force.cancelled() => continue,
            // The proxy closes every connection now: a dial in flight ends with it.
            () = shared.kill.cancelled() => return Routed::Killed,
        };
        match dialed {
            Ok(_) if generation.force.is_cancelled() => continue,
            Ok(server) => {
                if let Err(e) = socket::set_keepalive(&server, cfg.keepalive) {
                    debug!(listener = %cfg.name, backend = %addr, error = %e, "cannot set backend socket options");
                }
                connected(shared, &backend, generation, start.elapsed());
                return Routed::Ready(guard, backend, server);
            }
            Err(e) => {
                Counters::add(&c.dial_errors, 1);
                let local = is_local_error(&e);
                if !local {
                    // Out of file descriptors or ports here says nothing about the backend.
                    Counters::add(&backend.counters.dial_errors, 1);
                    backend.mark_refused();
                }
                attempts += 1;
                let spent = start.elapsed();
                if attempts >= cfg.dial_attempts || spent >= cfg.dial_budget {
                    Counters::add(&c.failed, 1);
                    if !local {
                        Counters::add(&backend.counters.failed, 1);
                    }
                    warn!(listener = %cfg.name, peer = %peer, backend = %addr, attempts, local, error = %e, "dial failed; closing client connection");
                    return Routed::Failed;
                }
                Counters::add(&c.retries, 1);
                Counters::add(&backend.counters.retries, 1);
                debug!(listener = %cfg.name, backend = %addr, attempt = attempts, local, error = %e, "dial failed; retrying");
                drop(guard);
                let pause = backoff(attempts).min(cfg.dial_budget.saturating_sub(spent));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.kill.cancelled() => return Routed::Killed,
                }
            }
        }
    }
}

/// Where counting a connection into its route's generation ended.
enum Entered {
    /// Counted in (the guard) with the backend to dial.
    Ready(GenerationGuard, Arc<BackendState>),
    /// The route changed between the load and the count: look again.
    Changed,
    /// The generation has no backend.
    NoBackend,
}

/// Takes the generation guard of `route` (just loaded, forwarding), re-checks the route and
/// picks a backend: the part of the accept path between the route load and the dial.
fn enter(shared: &Shared, route: &Arc<Route>) -> Entered {
    let generation = &route.generation;
    let guard = generation.enter();
    // Re-check after counting ourselves in: either a drain of this generation sees us,
    // or we see the route that replaced it (see GenerationGuard).
    {
        let now = shared.route.load();
        if !Arc::ptr_eq(&now.generation, generation) || matches!(now.mode, Mode::Hold(_)) {
            return Entered::Changed;
        }
    }
    match generation.pick() {
        Some(backend) => Entered::Ready(guard, Arc::clone(backend)),
        None => Entered::NoBackend,
    }
}

/// Counts a connection the backend accepted after `took` (retries included).
fn connected(shared: &Shared, backend: &BackendState, generation: &Generation, took: Duration) {
    shared.connect.record(took);
    backend.connect.record(took);
    Counters::add(&backend.counters.accepted, 1);
    generation.count_accepted();
}

/// The accept path of one connection without its sockets, for the `accept_path` benchmark:
/// the accept count, the route load, the generation guard and re-check, the backend pick,
/// the connect-latency and accepted counters, the active gauges, and the guard's release.
/// The same functions the connection path calls, in the same order. Returns whether a
/// backend was found.
#[doc(hidden)]
pub fn accept_path_once(listener: &Listener, took: Duration) -> bool {
    let shared = &*listener.0;
    Counters::add(&shared.counters.accepted, 1);
    let route = shared.route.load_full();
    if !matches!(route.mode, Mode::Forward) {
        return false;
    }
    match enter(shared, &route) {
        Entered::Ready(guard, backend) => {
            connected(shared, &backend, guard.generation(), took);
            let _active = Gauge::new(&shared.counters.active, &backend.counters.active);
            true
        }
        Entered::Changed | Entered::NoBackend => false,
    }
}

/// Whether a dial failed for a reason of this host (descriptors, memory, local ports)
/// rather than of the backend.
fn is_local_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        matches!(
            Errno::from_raw(code),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM | Errno::EADDRNOTAVAIL
        )
    })
}

/// Wait before retry `attempt` (1-based): 10 ms, 20 ms, 40 ms ... up to 500 ms. Short,
/// because the next try usually goes to another backend or to a route just swapped in.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << attempt.saturating_sub(1).min(6)))
        .min(Duration::from_millis(500))
}

/// A stable offset in `[0, window)` for this connection.
fn spread(peer: SocketAddr, window: Duration) -> Duration {
    let window = window.min(crate::listener::MAX_WAIT);
    let seed = u64::from(peer.port()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let frac = (seed >> 11) as f64 / (1u64 << 53) as f64;
    window.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(10));
        assert_eq!(backoff(2), Duration::from_millis(20));
        assert_eq!(backoff(30), Duration::from_millis(500));
    }

    #[test]
    fn spread_stays_in_window() {
        let w = Duration::from_secs(1);
        let offsets: Vec<_> = (1000..1100u16)
            .map(|p| spread(SocketAddr::from(([127, 0, 0, 1], p)), w))
            .collect();
        assert!(offsets.iter().all(|d| *d < w));
        let distinct: std::collections::BTreeSet<_> = offsets.iter().collect();
        assert!(distinct.len() > 90, "offsets should differ between connections");
    }
}
