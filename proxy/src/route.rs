//! Routes and generations.
//!
//! A [`Route`] is the immutable value a listener's accept path loads once per connection:
//! the current [`Generation`] (its backends and counters) and a mode, forward or hold.
//! Swapping installs a new route with a new generation; pausing installs a route with the
//! same generation in hold mode.
//!
//! *Invariant*: a connection forwards only while it holds a [`GenerationGuard`] of the
//! generation it was routed under, taken before its first dial. A generation whose guard
//! count is zero after it stopped being current has drained.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::{BackendSnapshot, Counters, GenerationPhase, GenerationSnapshot, Latency};

/// A backend address, with an optional label saying what is behind it (shown by status).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Address to dial.
    pub addr: SocketAddr,
    /// What serves at `addr`, for example `app-1 (3f2a9c1b)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Backend {
    /// A backend with no label.
    pub fn new(addr: SocketAddr) -> Self {
        Backend { addr, label: None }
    }

    /// A backend with a label.
    pub fn labeled(addr: SocketAddr, label: impl Into<String>) -> Self {
        Backend {
            addr,
            label: Some(label.into()),
        }
    }
}

impl From<SocketAddr> for Backend {
    fn from(addr: SocketAddr) -> Self {
        Backend::new(addr)
    }
}

/// How long a backend that refused a dial is skipped by round-robin (unless every backend
/// of the route was refused recently, in which case it is tried anyway).
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);

/// A backend with its counters. Shared between consecutive generations that keep the same
/// address, so its numbers survive a swap.
#[derive(Debug)]
pub(crate) struct BackendState {
    pub backend: Backend,
    pub counters: Counters,
    pub connect: Latency,
    /// Milliseconds since `epoch` until which this backend is skipped; 0 when it is not.
    refused_until_ms: AtomicU64,
    epoch: Instant,
}

impl BackendState {
    pub(crate) fn new(backend: Backend, epoch: Instant) -> Self {
        BackendState {
            backend,
            counters: Counters::default(),
            connect: Latency::default(),
            refused_until_ms: AtomicU64::new(0),
            epoch,
        }
    }

    pub(crate) fn mark_refused(&self) {
        let until = self.epoch.elapsed() + REFUSED_BACKOFF;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.refused_until_ms.store(ms, Ordering::Relaxed);
    }

    fn recently_refused(&self, now_ms: u64) -> bool {
        self.refused_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub(crate) fn snapshot(&self) -> BackendSnapshot {
        BackendSnapshot {
            addr: self.backend.addr,
            label: self.backend.label.clone(),
            counters: self.counters.snapshot(),
            connect: self.connect.snapshot(),
        }
    }
}

/// One generation of a listener's route: the backends connections are sent to, and the
/// connections that were routed under it.
#[derive(Debug)]
pub(crate) struct Generation {
    pub id: u64,
    pub backends: Vec<Arc<BackendState>>,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// Live connections routed under this generation. SeqCst: see [`GenerationGuard`].
    active: AtomicU64,
    accepted: AtomicU64,
    pub forced: AtomicU64,
    /// Signalled each time `active` drops to zero.
    zero: Notify,
    /// Set once the generation is no longer current.
    retired: AtomicBool,
    /// Drain deadline in milliseconds since `epoch`, set when retired.
    deadline_ms: AtomicU64,
    /// Cancelled when the drain deadline passes: remaining connections close.
    pub force: CancellationToken,
    /// Cancelled once retired and empty (or forced empty), after `report` is set.
    pub drained: CancellationToken,
    /// How the drain ended, once it has.
    pub report: std::sync::OnceLock<crate::listener::DrainReport>,
    epoch: Instant,
}

impl Generation {
    pub(crate) fn new(id: u64, backends: Vec<Arc<BackendState>>, epoch: Instant) -> Self {
        Generation {
            id,
            backends,
            next: AtomicUsize::new(0),
            active: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            zero: Notify::new(),
            retired: AtomicBool::new(false),
            deadline_ms: AtomicU64::new(0),
            force: CancellationToken::new(),
            drained: CancellationToken::new(),
            report: std::sync::OnceLock::new(),
            epoch,
        }
    }

    /// Round-robin pick, skipping backends that refused within the last second unless all
    /// of them did. `None` when the generation has no backend.
    pub(crate) fn pick(&self) -> Option<&Arc<BackendState>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if n == 1 {
            return self.backends.first();
        }
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        (0..n)
            .map(|i| &self.backends[(start + i) % n])
            .find(|b| !b.recently_refused(now_ms))
            .or_else(|| self.backends.get(start % n))
    }

    /// Counts a connection in this generation until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> GenerationGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        GenerationGuard(Arc::clone(self))
    }

    pub(crate) fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn active(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    pub(crate) fn retire(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.epoch).as_millis();
        self.deadline_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Resolves when `active` is zero.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn snapshot(&self) -> GenerationSnapshot {
        let retired = self.is_retired();
        let drained = self.drained.is_cancelled();
        let phase = match (retired, drained) {
            (false, _) => GenerationPhase::Current,
            (true, false) => GenerationPhase::Draining,
            (true, true) => GenerationPhase::Drained,
        };
        let drain_remaining_ms = (phase == GenerationPhase::Draining).then(|| {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.deadline_ms.load(Ordering::Relaxed).saturating_sub(now)
        });
        GenerationSnapshot {
            generation: self.id,
            phase,
            backends: self.backends.iter().map(|b| b.backend.addr).collect(),
            active: self.active(),
            accepted: self.accepted.load(Ordering::Relaxed),
            forced: self.forced.load(Ordering::Relaxed),
            drain_remaining_ms,
        }
    }
}

/// Membership of one connection in a generation.
///
/// The count is incremented with SeqCst *before* the connection re-checks that its
/// generation is still current, and a swap stores the new route *before* its drain reads
/// the count. So either the drain sees this connection, or this connection sees the new
/// route and goes there instead: no connection slips past a drain.
#[derive(Debug)]
pub(crate) struct GenerationGuard(Arc<Generation>);

impl GenerationGuard {
    pub(crate) fn generation(&self) -> &Arc<Generation> {
        &self.0
    }
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// A pause of a listener. Connections accepted during it wait until a route is installed
/// again or until `until`, whichever comes first.
#[derive(Debug)]
pub(crate) struct Hold {
    pub since: Instant,
    pub until: Instant,
    /// Set when the hold ran out before a resume or swap.
    pub expired: AtomicBool,
}

/// Whether a route forwards or holds.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    Forward,
    Hold(Arc<Hold>),
}

/// The value swapped atomically behind each listener.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub generation: Arc<Generation>,
    pub mode: Mode,
}
