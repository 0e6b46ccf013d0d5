//! A listener: one owned port, its route, and the control operations on it (swap, pause,
//! resume, wait for a drain).
//!
//! *Invariant*: the listening socket stays open for the listener's whole life; swaps,
//! pauses and resumes change only the route. Control operations are serialized by a mutex;
//! the accept path never takes it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ListenerConfig;
use crate::conn;
use crate::error::Error;
use crate::route::{Backend, BackendState, Generation, Hold, Mode, Route};
use crate::stats::{Counters, Latency, ListenerSnapshot};

/// How many finished drains each listener remembers for [`Listener::wait_drained`].
const DRAIN_HISTORY: usize = 256;

/// Result of a swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swap {
    /// The generation now current.
    pub generation: u64,
    /// The generation it replaced, now draining (or already drained when it had no
    /// connection). Equal to `generation` only for a resume that installed nothing new.
    pub previous: u64,
}

/// How a replaced generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// The generation that drained.
    pub generation: u64,
    /// Milliseconds from the swap to the last connection closing.
    pub took_ms: u64,
    /// Connections that were still open at the deadline and closed by the proxy.
    pub forced: u64,
}

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DrainStatus {
    /// Every connection of the generation is closed.
    Drained(DrainReport),
    /// Connections are still open.
    Pending {
        /// The generation waited on.
        generation: u64,
        /// Connections still open.
        active: u64,
        /// Milliseconds until the drain deadline.
        remaining_ms: u64,
    },
    /// The generation is still current: it drains after the next swap.
    Current {
        /// The generation waited on.
        generation: u64,
    },
}

/// State shared by a listener's accept loop, its connections and its handles.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The settings the listener was started with; its name, address, backlog and
    /// keepalive never change.
    pub cfg: ListenerConfig,
    /// The settings in force for what starts from now on (connections, swaps, pauses):
    /// `cfg` until [`Listener::update`] replaces them. Read through [`Shared::settings`].
    live: ArcSwap<ListenerConfig>,
    pub bind: SocketAddr,
    pub route: ArcSwap<Route>,
    /// Bumped at every route store, so held connections wake up and look again.
    pub changed: watch::Sender<()>,
    pub counters: Counters,
    pub connect: Latency,
    /// Current generation first, then retired ones that still have connections.
    generations: Mutex<VecDeque<Arc<Generation>>>,
    reports: Mutex<VecDeque<DrainReport>>,
    /// Backend states by (address, label), so a backend that comes back after a swap
    /// (blue, green, blue) continues its counters. Entries die with their last generation.
    backends: Mutex<HashMap<Backend, Weak<BackendState>>>,
    next_generation: AtomicU64,
    /// Serializes swap, pause and resume so route transitions happen in call order.
    control: Mutex<Option<CancellationToken>>,
    pub epoch: Instant,
    /// Cancelled to stop accepting.
    pub stop: CancellationToken,
    /// Cancelled to close every connection at once (forced shutdown).
    pub kill: CancellationToken,
    /// The listener's connection limit (`max_connections`), replaced whole by
    /// [`Listener::update`]; the accept loop loads it once per connection.
    pub limit: ArcSwapOption<Semaphore>,
    pub connections: TaskTracker,
    /// A duplicate of the listening socket, for a handover to a new agent process; dropped
    /// when the listener stops accepting, so that a removed listener's port closes.
    pub handover: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl Shared {
    /// The settings in force now (see `live`).
    pub(crate) fn settings(&self) -> Arc<ListenerConfig> {
        self.live.load_full()
    }
}

/// A handle on a running listener. Cheap to clone; all handles address the same listener.
#[derive(Debug, Clone)]
pub struct Listener(pub(crate) Arc<Shared>);

pub(crate) struct Parent {
    pub stop: CancellationToken,
    pub kill: CancellationToken,
    pub global_limit: Option<Arc<Semaphore>>,
    pub connections: TaskTracker,
}

impl Listener {
    /// Binds the socket and starts accepting. Must run inside a tokio runtime.
    pub(crate) fn start(cfg: ListenerConfig, parent: Parent) -> Result<Listener, Error> {
        let socket =
            crate::socket::listen(cfg.listen, cfg.backlog, cfg.keepalive).map_err(|source| Error::Bind {
                listener: cfg.name.clone(),
                addr: cfg.listen,
                source,
            })?;
        Listener::start_on(cfg, socket, parent, 1)
    }

    /// Starts accepting on `socket`, bound and listening already (by [`Listener::start`], or
    /// by a previous agent that handed it over), with the first generation numbered `first`.
    pub(crate) fn start_on(
        cfg: ListenerConfig,
        socket: TcpListener,
        parent: Parent,
        first: u64,
    ) -> Result<Listener, Error> {
        let bind = socket.local_addr().map_err(|source| Error::Bind {
            listener: cfg.name.clone(),
            addr: cfg.listen,
            source,
        })?;
        check_backends(&cfg.name, bind, &cfg.backends)?;
        let epoch = Instant::now();
        let mut registry = HashMap::new();
        let backends = cfg
            .backends
            .iter()
            .map(|b| backend_state(&mut registry, b.clone(), epoch))
            .collect();
        let first_generation = Arc::new(Generation::new(first, backends, epoch));
        let route = Route {
            generation: Arc::clone(&first_generation),
            mode: Mode::Forward,
        };
        // A duplicate of the socket for a handover to a new agent process (see `handover.rs`).
        let handover = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().ok();
        let shared = Arc::new(Shared {
            bind,
            route: ArcSwap::from_pointee(route),
            changed: watch::Sender::new(()),
            counters: Counters::default(),
            connect: Latency::default(),
            generations: Mutex::new(VecDeque::from([first_generation])),
            reports: Mutex::new(VecDeque::new()),
            backends: Mutex::new(registry),
            next_generation: AtomicU64::new(first.saturating_add(1)),
            handover: Mutex::new(handover),
            control: Mutex::new(None),
            epoch,
            stop: parent.stop.child_token(),
            kill: parent.kill.child_token(),
            limit: ArcSwapOption::new(connection_limit(cfg.max_connections)),
            connections: parent.connections,
            live: ArcSwap::from_pointee(cfg.clone()),
            cfg,
        });
        info!(listener = %shared.cfg.name, bind = %bind, backends = ?shared.cfg.backends.iter().map(|b| b.addr).collect::<Vec<_>>(), "listening");
        tokio::spawn(accept_loop(Arc::clone(&shared), socket, parent.global_limit));
        tokio::spawn(drop_handover_socket(Arc::downgrade(&shared)));
        Ok(Listener(shared))
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.0.cfg.name
    }

    /// The address the socket is bound to (the real port when `:0` was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.bind
    }

    /// The settings the listener was started with (see [`Listener::settings`] for those
    /// in force after an [`Listener::update`]).
    pub fn config(&self) -> &ListenerConfig {
        &self.0.cfg
    }

    /// The settings in force now: those of [`Listener::config`] with what
    /// [`Listener::update`] changed.
    pub fn settings(&self) -> Arc<ListenerConfig> {
        self.0.settings()
    }

    /// Applies `new`'s settings to what starts from now on: connections accepted after
    /// this call (connect timeout, dial attempts and budget, idle timeout, close window,
    /// the `max_connections` limit), the next swap (drain timeout) and the next pause
    /// (hold maximum). Open connections keep the settings they started with.
    ///
    /// The name, address, backlog and keepalive belong to the socket and are kept from
    /// [`Listener::config`]; backends change only through [`Listener::swap`]. A new
    /// `max_connections` counts the connections accepted from now on: those open at the
    /// update held a slot of the previous limit and are not counted against the new one.
    /// Returns the settings now in force.
    pub fn update(&self, new: &ListenerConfig) -> Arc<ListenerConfig> {
        let control = self.lock_control();
        let old = self.0.settings();
        let cfg = &self.0.cfg;
        let next = Arc::new(ListenerConfig {
            name: cfg.name.clone(),
            listen: cfg.listen,
            backends: old.backends.clone(),
            backlog: cfg.backlog,
            keepalive: cfg.keepalive,
            ..new.clone()
        });
        if next.max_connections != old.max_connections {
            let previous = self.0.limit.swap(connection_limit(next.max_connections));
            // The accept loop may be waiting for a slot of the previous limit: one more
            // slot lets it take the connection it is about to accept and load the new one.
            if let Some(sem) = previous {
                sem.add_permits(1);
            }
        }
        self.0.live.store(Arc::clone(&next));
        drop(control);
        info!(listener = %cfg.name, settings = ?next, "settings updated");
        next
    }
    /// The current generation number.
    pub fn generation(&self) -> u64 {
        self.0.route.load().generation.id
    }

    /// Whether the listener is paused.
    pub fn is_paused(&self) -> bool {
        matches!(self.0.route.load().mode, Mode::Hold(_))
    }

    /// Installs `backends` as a new generation. When this returns, every connection
    /// accepted afterwards goes to the new generation, and held connections are being
    /// dialed to it. Connections of the previous generation keep flowing until they close
    /// or `drain` (default: the listener's `drain_timeout`) passes. Must run inside a tokio
    /// runtime (the drain runs as a task).
    pub fn swap(&self, backends: Vec<Backend>, drain: Option<Duration>) -> Result<Swap, Error> {
        if backends.is_empty() {
            return Err(Error::NoBackends {
                listener: self.0.cfg.name.clone(),
            });
        }
        check_backends(&self.0.cfg.name, self.0.bind, &backends)?;
        // The new generation is built before the control lock is taken: a large swap on
        // this listener never delays another control operation longer than the store.
        let states = {
            let mut registry = lock(&self.0.backends);
            registry.retain(|_, w| w.strong_count() > 0);
            backends
                .into_iter()
                .map(|b| backend_state(&mut registry, b, self.0.epoch))
                .collect()
        };
        let mut control = self.lock_control();
        let old = self.0.route.load_full();
        let id = self.0.next_generation.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(Generation::new(id, states, self.0.epoch));
        lock(&self.0.generations).push_front(Arc::clone(&generation));
        self.0.route.store(Arc::new(Route {
            generation,
            mode: Mode::Forward,
        }));
        cancel_hold_timer(&mut control);
        self.0.changed.send_replace(());
        drop(control);

        let drain = drain.unwrap_or(self.0.settings().drain_timeout);
        retire(&self.0, old.generation.clone(), drain);
        info!(listener = %self.0.cfg.name, generation = id, previous = old.generation.id, drain = ?drain, "route swapped");
        Ok(Swap {
            generation: id,
            previous: old.generation.id,
        })
    }

    /// Pauses the listener: it keeps accepting but dials nothing until [`resume`] or
    /// [`swap`]. After `max` (default: the listener's `hold_max`) the hold ends by itself:
    /// held connections are closed and counted, and the listener forwards to its previous
    /// route again. Pausing a paused listener restarts the clock.
    ///
    /// [`resume`]: Listener::resume
    /// [`swap`]: Listener::swap
    pub fn pause(&self, max: Option<Duration>) -> Duration {
        // The figure returned (and reported) is the one in force: longer holds are cut to
        // MAX_WAIT.
        let max = max.unwrap_or(self.0.settings().hold_max).min(MAX_WAIT);
        let mut control = self.lock_control();
        let now = Instant::now();
        let hold = Arc::new(Hold {
            since: now,
            until: now + max,
            expired: Default::default(),
        });
        let current = self.0.route.load_full();
        self.0.route.store(Arc::new(Route {
            generation: Arc::clone(&current.generation),
            mode: Mode::Hold(Arc::clone(&hold)),
        }));
        cancel_hold_timer(&mut control);
        let timer = CancellationToken::new();
        *control = Some(timer.clone());
        self.0.changed.send_replace(());
        drop(control);
        tokio::spawn(expire_hold(Arc::clone(&self.0), hold, timer));
        info!(listener = %self.0.cfg.name, max = ?max, "paused");
        max
    }

    /// Ends a pause. With `backends`, installs them as a new generation (a swap, with
    /// `drain` as for [`swap`]); without, goes back to forwarding to the current route.
    /// Resuming a listener that is not paused and giving no backends changes nothing.
    ///
    /// [`swap`]: Listener::swap
    pub fn resume(&self, backends: Option<Vec<Backend>>, drain: Option<Duration>) -> Result<Swap, Error> {
        if let Some(backends) = backends {
            return self.swap(backends, drain);
        }
        let mut control = self.lock_control();
        let current = self.0.route.load_full();
        let id = current.generation.id;
        if let Mode::Hold(_) = current.mode {
            self.0.route.store(Arc::new(Route {
                generation: Arc::clone(&current.generation),
                mode: Mode::Forward,
            }));
            cancel_hold_timer(&mut control);
            self.0.changed.send_replace(());
            info!(listener = %self.0.cfg.name, generation = id, "resumed");
        }
        Ok(Swap {
            generation: id,
            previous: id,
        })
    }

    /// Waits up to `timeout` for `generation` to drain and says where it stands.
    pub async fn wait_drained(&self, generation: u64, timeout: Duration) -> Result<DrainStatus, Error> {
        let found = lock(&self.0.generations)
            .iter()
            .find(|g| g.id == generation)
            .cloned();
        let Some(g) = found else {
            return self.report(generation).map(DrainStatus::Drained);
        };
        if !g.is_retired() {
            return Ok(DrainStatus::Current { generation });
        }
        let _ = tokio::time::timeout(timeout.min(MAX_WAIT), g.drained.cancelled()).await;
        if let Some(report) = g.report.get() {
            return Ok(DrainStatus::Drained(*report));
        }
        let snap = g.snapshot();
        Ok(DrainStatus::Pending {
            generation,
            active: snap.active,
            remaining_ms: snap.drain_remaining_ms.unwrap_or(0),
        })
    }

    fn report(&self, generation: u64) -> Result<DrainReport, Error> {
        lock(&self.0.reports)
            .iter()
            .find(|r| r.generation == generation)
            .copied()
            .ok_or_else(|| Error::UnknownGeneration {
                listener: self.0.cfg.name.clone(),
                generation,
                current: self.generation(),
            })
    }

    /// Counters and state of the listener, its backends and its live generations.
    pub fn snapshot(&self) -> ListenerSnapshot {
        let route = self.0.route.load_full();
        let generations: Vec<_> = lock(&self.0.generations).iter().map(|g| g.snapshot()).collect();
        let draining = generations
            .iter()
            .filter(|g| g.generation != route.generation.id)
            .map(|g| g.active)
            .sum();
        let (mode, hold_remaining_ms) = match &route.mode {
            Mode::Forward => ("forward", None),
            Mode::Hold(h) => {
                let left = h.until.saturating_duration_since(Instant::now());
                ("hold", Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)))
            }
        };
        ListenerSnapshot {
            name: self.0.cfg.name.clone(),
            bind: self.0.bind,
            mode: mode.to_owned(),
            hold_remaining_ms,
            generation: route.generation.id,
            backends: route.generation.backends.iter().map(|b| b.snapshot()).collect(),
            draining,
            counters: self.0.counters.snapshot(),
            connect: self.0.connect.snapshot(),
            generations,
        }
    }

    /// Stops accepting. The socket closes once the accept loop has ended; live connections
    /// continue.
    pub(crate) fn stop_accepting(&self) {
        self.0.stop.cancel();
    }

    /// Stops accepting and retires the current generation: its connections keep flowing
    /// until they close or `drain` (default: the drain timeout in force) passes, then the
    /// rest are closed over the close window, as after a swap.
    pub(crate) fn stop_and_drain(&self, drain: Option<Duration>) -> u64 {
        self.0.stop.cancel();
        let drain = drain.unwrap_or(self.0.settings().drain_timeout);
        let control = self.lock_control();
        let current = self.0.route.load_full();
        if !current.generation.is_retired() {
            retire(&self.0, Arc::clone(&current.generation), drain);
        }
        drop(control);
        current.generation.id
    }

    fn lock_control(&self) -> MutexGuard<'_, Option<CancellationToken>> {
        lock(&self.0.control)
    }
}

/// Drops the listener's handover duplicate once it stops accepting (the accept loop drops
/// its own socket then), so that the port closes as it did before handovers existed.
async fn drop_handover_socket(shared: Weak<Shared>) {
    let Some(stop) = shared.upgrade().map(|s| s.stop.clone()) else {
        return;
    };
    stop.cancelled().await;
    if let Some(s) = shared.upgrade() {
        lock(&s.handover).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cancel_hold_timer(control: &mut Option<CancellationToken>) {
    if let Some(t) = control.take() {
        t.cancel();
    }
}

/// The state of backend `b`: the live one when a generation still uses it (its counters
/// carry on), else a new one.
fn backend_state(
    registry: &mut HashMap<Backend, Weak<BackendState>>,
    b: Backend,
    epoch: Instant,
) -> Arc<BackendState> {
    if let Some(live) = registry.get(&b).and_then(Weak::upgrade) {
        return live;
    }
    let state = Arc::new(BackendState::new(b.clone(), epoch));
    registry.insert(b, Arc::downgrade(&state));
    state
}

/// Most backends one route (one listener's generation, one swap) may have. Each backend
/// costs a few hundred bytes until it is first dialed, then a few KiB for its latency
/// histogram; the bound keeps a swap body from growing the agent without limit.
pub const MAX_BACKENDS: usize = 1024;

/// Refuses a route the listener bound at `bind` must not take: more than [`MAX_BACKENDS`]
/// backends, a backend on port 0 (nothing can be dialed there), or one that is the
/// listener itself ([`routes_to_itself`]). Shared by swap, resume and listener start.
pub fn check_backends(listener: &str, bind: SocketAddr, backends: &[Backend]) -> Result<(), Error> {
    if backends.len() > MAX_BACKENDS {
        return Err(Error::TooManyBackends {
            listener: listener.to_owned(),
            count: backends.len(),
            max: MAX_BACKENDS,
        });
    }
    if let Some(b) = backends.iter().find(|b| b.addr.port() == 0) {
        return Err(Error::PortZero {
            listener: listener.to_owned(),
            backend: b.addr,
        });
    }
    if let Some(b) = backends.iter().find(|b| routes_to_itself(bind, b.addr)) {
        return Err(Error::SelfLoop {
            listener: listener.to_owned(),
            backend: b.addr,
        });
    }
    Ok(())
}

/// Whether dialing `backend` would reach the listener bound at `bind` itself: every
/// connection would then loop through the proxy until descriptors run out.
///
/// Linux dials the unspecified address as the local host (`0.0.0.0` as `127.0.0.1`,
/// `[::]` as `[::1]`), and an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) as its IPv4
/// address; both are resolved that way before comparing. A listener on the unspecified
/// address takes loopback connections too.
pub fn routes_to_itself(bind: SocketAddr, backend: SocketAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    if bind.port() != backend.port() || bind.port() == 0 {
        return false;
    }
    let dialed = |ip: IpAddr| match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (b, t) = (bind.ip(), dialed(backend.ip()));
    b == t || (b.is_unspecified() && t.is_loopback() && b.is_ipv4() == t.is_ipv4())
}

/// Longest drain, hold or deadline the proxy takes; longer ones are cut to it, so that
/// deadline arithmetic cannot overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The semaphore behind a `max_connections` setting. Values beyond what tokio's semaphore
/// can count (2^61 - 1) are cut to that: no host gets near it, so it means no limit.
pub(crate) fn connection_limit(max: Option<usize>) -> Option<Arc<Semaphore>> {
    max.map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))))
}

fn deadline_after(d: Duration) -> Instant {
    Instant::now() + d.min(MAX_WAIT)
}

/// Marks `generation` replaced and drains it in the background.
fn retire(shared: &Arc<Shared>, generation: Arc<Generation>, drain: Duration) {
    let deadline = deadline_after(drain);
    generation.retire(deadline);
    tokio::spawn(drain_generation(Arc::clone(shared), generation, deadline));
}

/// Waits for a retired generation to empty; at the deadline closes what is left, spread
/// over the listener's close window; then files a [`DrainReport`].
async fn drain_generation(shared: Arc<Shared>, generation: Arc<Generation>, deadline: Instant) {
    let started = Instant::now();
    let name = &shared.cfg.name;
    tokio::select! {
        () = generation.wait_empty() => {}
        () = tokio::time::sleep_until(deadline) => {
            let left = generation.active();
            if left > 0 {
                let window = shared.settings().close_window;
                warn!(listener = %name, generation = generation.id, connections = left, window = ?window, "drain deadline passed; closing remaining connections");
                generation.force.cancel();
                // Closing is spread over the window. A generation is reported drained only
                // when it is empty: a connection still dialing gives up at `force` and
                // goes to the current route, so this ends promptly.
                let bound = window.min(MAX_WAIT) + Duration::from_secs(5);
                if tokio::time::timeout(bound, generation.wait_empty()).await.is_err() {
                    warn!(listener = %name, generation = generation.id, connections = generation.active(), "connections still open after the drain deadline; waiting for them");
                    generation.wait_empty().await;
                }
            }
        }
    }
    let report = DrainReport {
        generation: generation.id,
        took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        forced: generation.forced.load(Ordering::Relaxed),
    };
    let _ = generation.report.set(report);
    {
        let mut reports = lock(&shared.reports);
        if reports.len() == DRAIN_HISTORY {
            reports.pop_front();
        }
        reports.push_back(report);
    }
    lock(&shared.generations).retain(|g| !Arc::ptr_eq(g, &generation));
    generation.drained.cancel();
    info!(listener = %name, generation = report.generation, took_ms = report.took_ms, forced = report.forced, "generation drained");
}

/// Ends a hold that ran past its maximum: held connections see `expired` and close, and the
/// listener forwards to the route it had before the pause.
async fn expire_hold(shared: Arc<Shared>, hold: Arc<Hold>, cancelled: CancellationToken) {
    tokio::select! {
        () = cancelled.cancelled() => return,
        () = tokio::time::sleep_until(hold.until) => {}
    }
    let mut control = lock(&shared.control);
    if cancelled.is_cancelled() {
        return;
    }
    let current = shared.route.load_full();
    if let Mode::Hold(h) = &current.mode
        && Arc::ptr_eq(h, &hold)
    {
        hold.expired.store(true, Ordering::SeqCst);
        shared.route.store(Arc::new(Route {
            generation: Arc::clone(&current.generation),
            mode: Mode::Forward,
        }));
        *control = None;
        shared.changed.send_replace(());
        warn!(listener = %shared.cfg.name, held_for = ?hold.until - hold.since, "hold expired; held connections closed, forwarding to the previous route");
    }
}

async fn accept_loop(shared: Arc<Shared>, socket: TcpListener, global: Option<Arc<Semaphore>>) {
    let name = shared.cfg.name.clone();
    let mut last_warning = None;
    // Accepted sockets are registered with the runtime that serves them (a worker's, see
    // `worker.rs`), not with this one: the listener is polled through `AsyncFd` and
    // accept(2) returns a socket no reactor knows yet.
    // `AsyncFd::new` is deprecated because a type that merely borrows its descriptor could
    // close it while registered; `std::net::TcpListener` owns its descriptor and is moved
    // in, so it lives exactly as long as the registration (the safe alternative,
    // `AsyncFd::register`, is an `unsafe fn`, and this crate forbids unsafe code).
    #[allow(deprecated)]
    let socket = match socket.into_std().and_then(tokio::io::unix::AsyncFd::new) {
        Ok(s) => s,
        Err(e) => {
            warn!(listener = %name, error = %e, "cannot poll the listening socket; not accepting");
            return;
        }
    };
    loop {
        // Past a limit the listener stops accepting: new connections wait in the kernel's
        // accept queue (up to the backlog) until a slot frees, instead of being refused.
        // The listener's own slot is taken before accept(); the global one only after,
        // so a listener with nothing to accept never holds a slot another listener needs
        // (with L listeners a global limit of N would otherwise serve only N - (L - 1)).
        let Some(local_permit) = acquire(&shared.limit.load_full(), &shared.stop).await else {
            break;
        };
        let accepted = tokio::select! {
            () = shared.stop.cancelled() => break,
            r = crate::socket::accept(&socket) => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Waits in line (the semaphore is fair) with the other listeners; the
                // accepted connection is not served until then.
                let Some(global_permit) = acquire(&global, &shared.stop).await else {
                    break;
                };
                let permits = (global_permit, local_permit);
                let serve = conn::start(Arc::clone(&shared), stream, peer, permits);
                match crate::worker::pick() {
                    Some(worker) => shared.connections.spawn_on(serve, worker),
                    None => shared.connections.spawn(serve),
                };
                // Counted once tracked: whoever sees it counted (a shutdown) also finds the
                // connection in `connections`. The first `pick` starts the workers, which
                // takes long enough for a shutdown to slip in between.
                Counters::add(&shared.counters.accepted, 1);
            }
            Err(e) if retry_at_once(&e) => {
                debug!(listener = %name, error = %e, "accept: connection gone before it was accepted; retrying");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: back off instead of spinning, and say
                // so at most once a second.
                if last_warning.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(listener = %name, error = %e, "accept failed; retrying in 50 ms");
                    last_warning = Some(Instant::now());
                }
                tokio::select! {
                    () = shared.stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    debug!(listener = %name, "stopped accepting");
}

/// Whether accept(2) failed for a reason that concerns only the connection it was about to
/// return (aborted before accept, a pending network error, a signal): accept(2) says to
/// retry at once. Resource shortages (descriptors, memory) are not among them.
pub(crate) fn retry_at_once(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::Interrupted | K::WouldBlock | K::ConnectionReset
    ) {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        use nix::errno::Errno;
        if let Some(code) = e.raw_os_error() {
            return matches!(
                Errno::from_raw(code),
                Errno::EPROTO
                    | Errno::ENETDOWN
                    | Errno::ENOPROTOOPT
                    | Errno::EHOSTDOWN
                    | Errno::ENONET
                    | Errno::EHOSTUNREACH
                    | Errno::EOPNOTSUPP
                    | Errno::ENETUNREACH
                    | Errno::EPERM
            );
        }
    }
    false
}

async fn acquire(
    limit: &Option<Arc<Semaphore>>,
    stop: &CancellationToken,
) -> Option<Option<OwnedSemaphorePermit>> {
    let Some(sem) = limit else { return Some(None) };
    tokio::select! {
        () = stop.cancelled() => None,
        p = Arc::clone(sem).acquire_owned() => p.ok().map(Some),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::retry_at_once;

    /// Issue 9 item 4: accept(2) errors about one connection are retried at once, resource
    /// shortages back off.
    #[test]
    fn accept_errors_that_concern_one_connection_are_retried_at_once() {
        for code in [
            libc_code("ECONNABORTED"),
            libc_code("EINTR"),
            libc_code("EPROTO"),
            libc_code("ENETDOWN"),
        ] {
            assert!(retry_at_once(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [
            libc_code("EMFILE"),
            libc_code("ENFILE"),
            libc_code("ENOBUFS"),
            libc_code("ENOMEM"),
        ] {
            assert!(!retry_at_once(&io::Error::from_raw_os_error(code)), "{code}");
        }
    }

    fn libc_code(name: &str) -> i32 {
        use nix::errno::Errno;
        (match name {
            "ECONNABORTED" => Errno::ECONNABORTED,
            "EINTR" => Errno::EINTR,
            "EPROTO" => Errno::EPROTO,
            "ENETDOWN" => Errno::ENETDOWN,
            "EMFILE" => Errno::EMFILE,
            "ENFILE" => Errno::ENFILE,
            "ENOBUFS" => Errno::ENOBUFS,
            _ => Errno::ENOMEM,
        }) as i32
    }
}
