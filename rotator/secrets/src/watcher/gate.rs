//! [`Gate`]: every call the watcher makes to one provider passes here. It bounds calls in
//! flight (`Limits::concurrency`), spaces calls to at most `Limits::rate_per_sec`, gives
//! each call its deadline (`Limits::timeout`), and retries transient errors
//! (`Limits::retry_attempts`, doubling `Limits::retry_backoff`, never sooner than the
//! provider's `Retry-After`). A throttling answer pushes back every later call to that
//! provider, not only the one that was throttled. Each attempt's outcome is counted in the
//! provider's [`ProviderStats`] here, where a timeout is still told apart.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::stats::{Call, ErrorKind, ProviderStats};
use crate::error::{Error, Result};
use crate::spec::Limits;

/// The concurrency and rate limit of one provider instance.
pub(crate) struct Gate {
    /// Provider instance name (for the timeout error).
    provider: String,
    /// The limits from the provider's settings.
    limits: Limits,
    /// Calls in flight.
    permits: Semaphore,
    /// The earliest instant the next call may start (a reservation clock: each call takes
    /// the slot `max(now, next)` and moves `next` one spacing further).
    next: Mutex<Option<Instant>>,
    /// Time between two call starts.
    spacing: Duration,
    /// Where each attempt is counted.
    stats: Arc<ProviderStats>,
}

impl Gate {
    /// A gate for `provider` with `limits`, counting attempts in `stats`.
    pub(crate) fn new(provider: &str, limits: Limits, stats: Arc<ProviderStats>) -> Gate {
        let rate = if limits.rate_per_sec.is_finite() && limits.rate_per_sec > 0.0 {
            limits.rate_per_sec
        } else {
            f64::MAX
        };
        Gate {
            provider: provider.to_string(),
            permits: Semaphore::new(limits.concurrency.max(1)),
            next: Mutex::new(None),
            spacing: Duration::from_secs_f64(1.0 / rate),
            limits,
            stats,
        }
    }

    /// Runs `call` (a call of kind `which`) within the limits, retrying transient errors.
    pub(crate) async fn run<T, F, Fut>(&self, which: Call, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let attempts = self.limits.retry_attempts.max(1);
        let mut backoff = self.limits.retry_backoff;
        let mut attempt = 1;
        loop {
            let result = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("gate semaphore is never closed");
                self.wait_slot().await;
                match tokio::time::timeout(self.limits.timeout, call()).await {
                    Ok(r) => {
                        self.stats
                            .count(which, r.as_ref().map(|_| ()).map_err(ErrorKind::of));
                        r
                    }
                    Err(_) => {
                        self.stats.count(which, Err(ErrorKind::Timeout));
                        Err(Error::Unavailable {
                            provider: self.provider.clone(),
                            detail: format!("no answer within {:?}", self.limits.timeout),
                        })
                    }
                }
            };
            match result {
                Err(e) if e.is_transient() && attempt < attempts => {
                    let wait = backoff.max(e.retry_after().unwrap_or_default());
                    if let Some(after) = e.retry_after() {
                        self.push_back(after);
                    }
                    tokio::time::sleep(wait).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => {
                    if let Some(after) = e.retry_after() {
                        self.push_back(after);
                    }
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    /// Waits for this call's slot under the rate limit.
    async fn wait_slot(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.spacing);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// No call to this provider starts before `after` from now.
    fn push_back(&self, after: Duration) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let until = Instant::now() + after;
        *next = Some(next.map_or(until, |n| n.max(until)));
    }
}
