//! The state shared by the listeners and the signal handler: who this instance is, whether
//! it reports healthy, and how many reloads (SIGHUP) it has seen.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared state of one test server process.
#[derive(Debug)]
pub struct State {
    /// Named in the TCP greeting and at `GET /id`, so a test knows which container served it.
    instance_id: String,
    /// When the server started; health is measured from here.
    started: Instant,
    /// Unhealthy until this long after `started` (a slow-starting service).
    healthy_after: Duration,
    /// Never healthy, whatever `POST /health/ok` says (a green that must be rolled back).
    never_healthy: bool,
    /// Set by `POST /health/fail`, cleared by `POST /health/ok`.
    failed: AtomicBool,
    /// SIGHUPs received: a test of the `signal` strategy reads it at `GET /reloads`.
    reloads: AtomicU64,
}

impl State {
    /// Creates the state at server start.
    pub fn new(instance_id: String, healthy_after: Duration, never_healthy: bool) -> Self {
        Self {
            instance_id,
            started: Instant::now(),
            healthy_after,
            never_healthy,
            failed: AtomicBool::new(false),
            reloads: AtomicU64::new(0),
        }
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Whether `GET /health` answers 200 now.
    pub fn is_healthy(&self) -> bool {
        !self.never_healthy
            && !self.failed.load(Ordering::Relaxed)
            && self.started.elapsed() >= self.healthy_after
    }

    /// Forces the health endpoint to 503 (`true`) or back to normal (`false`).
    pub fn set_failed(&self, failed: bool) {
        self.failed.store(failed, Ordering::Relaxed);
    }

    /// Counts one reload and logs it; returns the new count.
    pub fn reload(&self) -> u64 {
        let n = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("dso-testsrv {}: reloaded (count {n})", self.instance_id);
        n
    }

    /// Reloads seen so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_delay_and_overrides() {
        let s = State::new("a".into(), Duration::ZERO, false);
        assert!(s.is_healthy());
        s.set_failed(true);
        assert!(!s.is_healthy());
        s.set_failed(false);
        assert!(s.is_healthy());

        assert!(!State::new("b".into(), Duration::from_secs(3600), false).is_healthy());

        let never = State::new("c".into(), Duration::ZERO, true);
        never.set_failed(false);
        assert!(!never.is_healthy());
    }

    #[test]
    fn reloads_count() {
        let s = State::new("a".into(), Duration::ZERO, false);
        assert_eq!((s.reload(), s.reload(), s.reloads()), (1, 2, 2));
    }
}
