//! Following Docker events: rescan after each relevant event, and reconnect with backoff
//! when the stream breaks (the daemon restarted), rescanning after the reconnect.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::{Engine, short};
use crate::rotator::Rotator;

/// How often the watcher looks for gone services whose grace has passed.
const RELEASE_TICK: Duration = Duration::from_millis(250);

impl<E: Engine> Rotator<E> {
    /// Follows Docker events until `stop`, reconciling after each relevant event and
    /// after each reconnect (with backoff from 200 ms to 10 s while the daemon is away).
    pub async fn watch(&self, stop: CancellationToken) {
        const FIRST: Duration = Duration::from_millis(200);
        let mut backoff = FIRST;
        while !stop.is_cancelled() {
            let mut events = self.inner.engine.events();
            match self.reconcile().await {
                Err(e) => warn!(error = %e, retry_in = ?backoff, "docker unreachable"),
                Ok(_) => loop {
                    let ev = tokio::select! {
                        () = stop.cancelled() => return,
                        ev = events.next() => ev,
                        // Listeners of services gone for the grace period are released
                        // without waiting for another event.
                        () = tokio::time::sleep(RELEASE_TICK), if self.inner.gateway.has_gone() => {
                            self.inner.gateway.release_gone(self.inner.cfg.release_grace);
                            continue;
                        }
                    };
                    match ev {
                        Some(Ok(ev)) => {
                            // The stream works: the next break starts from a short wait.
                            backoff = FIRST;
                            if relevant(&ev.action) {
                                info!(container = short(&ev.id), action = %ev.action, "docker event");
                                if let Err(e) = self.reconcile().await {
                                    warn!(error = %e, "reconcile failed");
                                }
                                // Nobody listening is not an error.
                                let _ = self.inner.engine_events.send(ev);
                            }
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, retry_in = ?backoff, "docker event stream broke; reconnecting");
                            break;
                        }
                        None => {
                            warn!(retry_in = ?backoff, "docker event stream ended; reconnecting");
                            break;
                        }
                    }
                },
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = backoff.saturating_mul(2).min(Duration::from_secs(10));
        }
    }
}

fn relevant(action: &str) -> bool {
    matches!(
        action,
        "start" | "die" | "destroy" | "rename" | "stop" | "kill" | "unpause" | "pause"
    ) || action.starts_with("health_status")
}
