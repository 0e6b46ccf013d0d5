//! Counters measured on the data path, and the serializable snapshots built from them.
//!
//! Counters are relaxed atomics, each on its own cache line (connections on different
//! threads bump different counters of the same listener without sharing a line): each is
//! exact on its own, a snapshot is not a single instant across counters. Connect latency
//! goes into a lock-free log-bucket histogram ([`Latency`]), touched once per connection,
//! never per byte; its count, sum and maximum are exact.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A value alone on its cache line (64 bytes on the machines dso runs on).
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Padded<T>(pub T);

impl<T> Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Counters of one listener or one backend.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: Padded<AtomicU64>,
    pub active: Padded<AtomicU64>,
    pub held: Padded<AtomicU64>,
    pub bytes_in: Padded<AtomicU64>,
    pub bytes_out: Padded<AtomicU64>,
    pub dial_errors: Padded<AtomicU64>,
    pub retries: Padded<AtomicU64>,
    pub failed: Padded<AtomicU64>,
    pub forced_closes: Padded<AtomicU64>,
    pub hold_timeouts: Padded<AtomicU64>,
    pub idle_timeouts: Padded<AtomicU64>,
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

/// Sub-buckets per power of two: a recorded value lands in a bucket at most 1/64 (1.6 %)
/// wider than its lower edge.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket each.
const LINEAR: u64 = 2 << SUB_BITS;
/// Values from 2^42 µs (51 days, beyond any connect time) share the top bucket; the
/// maximum and the sum stay exact.
const TOP_BIT: u32 = 42;
const BUCKETS: usize = (TOP_BIT - SUB_BITS - 1) as usize * SUB + 2 * SUB;

/// Bucket of a value in microseconds.
fn bucket(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let us = us.min((1 << TOP_BIT) - 1);
    let shift = 63 - us.leading_zeros() - SUB_BITS;
    (shift as usize) * SUB + (us >> shift) as usize
}

/// Highest value that lands in bucket `i` (what a percentile reports, as HDR histograms do).
fn bucket_high(i: usize) -> u64 {
    if (i as u64) < LINEAR {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let mantissa = (i - shift as usize * SUB) as u64;
    ((mantissa + 1) << shift) - 1
}

/// Connect latency: from the moment a connection is routed (after any hold) until the
/// backend accepted it, retries included. Microseconds in log-linear buckets (64 per power
/// of two: percentiles within 1.6 %), with the exact count, sum and maximum.
///
/// Recording is lock-free (a few relaxed atomic adds), so the accept path takes no lock.
/// The buckets (19 KB) are allocated at the first record: a backend that was never dialed
/// costs only the struct.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    buckets: OnceLock<Box<[AtomicU64]>>,
    sum_us: Padded<AtomicU64>,
    max_us: Padded<AtomicU64>,
}

impl Latency {
    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let buckets = self
            .buckets
            .get_or_init(|| (0..BUCKETS).map(|_| AtomicU64::new(0)).collect());
        buckets[bucket(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let Some(buckets) = self.buckets.get() else {
            return LatencySnapshot::default();
        };
        let counts: Vec<u64> = buckets.iter().map(|b| b.load(Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySnapshot::default();
        }
        let max_us = self.max_us.load(Relaxed);
        let at = |q: f64| {
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_high(i).min(max_us);
                }
            }
            max_us
        };
        LatencySnapshot {
            count,
            sum_us: self.sum_us.load(Relaxed),
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_within_a_sixty_fourth() {
        let mut last = 0;
        for us in 1..200_000u64 {
            let b = bucket(us);
            assert!(b == last || b == last + 1, "gap at {us}");
            last = b;
            let high = bucket_high(b);
            assert!(high >= us, "{us} above its bucket's top {high}");
            assert!((high - us) as f64 <= us as f64 / 64.0, "{us}: bucket top {high}");
        }
        assert!(bucket(u64::MAX) < BUCKETS);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn exact_count_sum_and_max_percentiles_close() {
        let l = Latency::default();
        assert_eq!(l.snapshot(), LatencySnapshot::default());
        assert!(l.buckets.get().is_none(), "no buckets before the first record");
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.snapshot();
        assert_eq!(s.count, 1000);
        assert_eq!(s.sum_us, 500_500);
        assert_eq!(s.max_us, 1000);
        assert!((500..=508).contains(&s.p50_us), "{s:?}");
        assert!((990..=1000).contains(&s.p99_us), "{s:?}");
        l.record(Duration::MAX);
        assert_eq!(l.snapshot().max_us, u64::MAX);
    }

    #[test]
    fn counters_sit_on_their_own_cache_lines() {
        assert_eq!(std::mem::align_of::<Padded<AtomicU64>>(), 64);
        let c = Counters::default();
        let a = std::ptr::from_ref(&c.accepted) as usize;
        let b = std::ptr::from_ref(&c.active) as usize;
        assert!(b.abs_diff(a) >= 64);
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
