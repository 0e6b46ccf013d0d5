//! Counters measured on the data path, and the serializable snapshots built from them.
//!
//! Counters are relaxed atomics: each is exact on its own, a snapshot is not a single
//! instant across counters. Connect latency goes into an HDR histogram behind a mutex,
//! touched once per connection, never per byte.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Counters of one listener or one backend.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub held: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dial_errors: AtomicU64,
    pub retries: AtomicU64,
    pub failed: AtomicU64,
    pub forced_closes: AtomicU64,
    pub hold_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            accepted: self.accepted.load(Relaxed),
            active: self.active.load(Relaxed),
            held: self.held.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            dial_errors: self.dial_errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failed: self.failed.load(Relaxed),
            forced_closes: self.forced_closes.load(Relaxed),
            hold_timeouts: self.hold_timeouts.load(Relaxed),
            idle_timeouts: self.idle_timeouts.load(Relaxed),
        }
    }
}

/// Connect latency: from the moment a connection is routed (after any hold) until the
/// backend accepted it, retries included. Microseconds, 3 significant digits, plus the
/// exact sum (the histogram only keeps bucketed values).
#[derive(Debug)]
pub(crate) struct Latency(Mutex<(Histogram<u64>, u64)>);

impl Default for Latency {
    fn default() -> Self {
        // 1 µs .. 1 h covers every connect timeout a user can configure.
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid");
        Latency(Mutex::new((h, 0)))
    }
}

impl Latency {
    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0.saturating_record(us);
        g.1 = g.1.saturating_add(us);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (h, sum_us) = (&g.0, g.1);
        if h.is_empty() {
            return LatencySnapshot::default();
        }
        LatencySnapshot {
            count: h.len(),
            sum_us,
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

/// Counter values at one moment. `active` and `held` are gauges; the rest only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections currently forwarding.
    pub active: u64,
    /// Connections accepted and waiting for a route (listener paused).
    pub held: u64,
    /// Bytes from clients to backends.
    pub bytes_in: u64,
    /// Bytes from backends to clients.
    pub bytes_out: u64,
    /// Backend dials that failed (refused, unreachable, timed out).
    pub dial_errors: u64,
    /// Dials retried on another (or the same) backend before the first byte.
    pub retries: u64,
    /// Client connections closed because no backend could be dialed within the budget,
    /// or because the route had no backend.
    pub failed: u64,
    /// Connections closed by the proxy when a drain deadline passed or on forced shutdown.
    pub forced_closes: u64,
    /// Held connections closed because the hold lasted longer than its maximum.
    pub hold_timeouts: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
}

/// Percentiles of connect latency, in microseconds. All zero when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// Number of connects recorded.
    pub count: u64,
    /// Sum of every recorded connect time (exact, not bucketed).
    #[serde(default)]
    pub sum_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Maximum.
    pub max_us: u64,
}

/// One backend as seen by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSnapshot {
    /// Address dialed.
    pub addr: SocketAddr,
    /// What is behind it (for example a container name and ID), when the caller said.
    pub label: Option<String>,
    /// Counters of connections sent to this backend.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Connect latency to this backend.
    pub connect: LatencySnapshot,
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationPhase {
    /// New connections go here.
    Current,
    /// Replaced; its connections finish or are closed at the deadline.
    Draining,
    /// Replaced and no connection left.
    Drained,
}

/// One generation of a listener's route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationSnapshot {
    /// Generation number; grows by one at each swap.
    pub generation: u64,
    /// Current, draining or drained.
    pub phase: GenerationPhase,
    /// Backend addresses of this generation.
    pub backends: Vec<SocketAddr>,
    /// Connections of this generation still open.
    pub active: u64,
    /// Connections routed under this generation in total.
    pub accepted: u64,
    /// Connections of this generation closed at the drain deadline.
    pub forced: u64,
    /// Milliseconds until the drain deadline, while draining.
    pub drain_remaining_ms: Option<u64>,
}

/// One listener as seen by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSnapshot {
    /// Listener name.
    pub name: String,
    /// Address the listener is bound to.
    pub bind: SocketAddr,
    /// `forward` or `hold`.
    pub mode: String,
    /// Milliseconds left before a hold expires, while paused.
    pub hold_remaining_ms: Option<u64>,
    /// Current generation.
    pub generation: u64,
    /// Backends of the current generation.
    pub backends: Vec<BackendSnapshot>,
    /// Connections still open in generations that were replaced.
    pub draining: u64,
    /// Listener-wide counters.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Listener-wide connect latency.
    pub connect: LatencySnapshot,
    /// Current and draining generations, newest first.
    pub generations: Vec<GenerationSnapshot>,
}

/// Every listener of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySnapshot {
    /// Listeners sorted by name.
    pub listeners: Vec<ListenerSnapshot>,
}
