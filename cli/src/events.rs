//! The agent's event bus: one broadcast of what happens (rotation steps, secret changes,
//! provider health, Docker events of managed containers), read by `GET /v1/events`
//! (server-sent events, `dso watch`) and by the outgoing webhooks.
//!
//! Invariant: an event carries names, versions, container IDs and redacted errors, never a
//! secret value; every text field passes the redactor before it is published.
//!
//! Publishing never blocks and never fails: a subscriber that falls behind by more than
//! [`CAPACITY`] events loses the oldest ones and is told how many (`lagged`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// Events a slow subscriber may fall behind before it loses the oldest.
pub const CAPACITY: usize = 1024;

/// One event as it is published and streamed.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Increasing per agent process, from 1; the SSE `id:`.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub unix_ms: u64,
    /// Dotted kind, like `rotation.step` or `secret.changed` (the SSE `event:`); the
    /// list is in docs/api.md.
    pub kind: String,
    /// The kind's fields (a JSON object).
    pub data: serde_json::Value,
}

/// The bus. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    seq: AtomicU64,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::new()
    }
}

// Removed once the producers and `GET /v1/events` use the bus (issue 11 work in progress).
#[allow(dead_code)]
impl Bus {
    /// A bus with no subscriber yet.
    pub fn new() -> Bus {
        let (tx, _) = broadcast::channel(CAPACITY);
        Bus {
            inner: Arc::new(Inner {
                tx,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// Publishes an event of `kind` with `data` (a JSON object; string fields pass the
    /// redactor). Returns the event's sequence number.
    pub fn publish(&self, kind: &str, mut data: serde_json::Value) -> u64 {
        redact(&mut data);
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // No subscriber is not an error: nobody is watching.
        let _ = self.inner.tx.send(Arc::new(Event {
            seq,
            unix_ms,
            kind: kind.to_owned(),
            data,
        }));
        seq
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }
}

/// Runs every string of `v` through the global redactor.
#[allow(dead_code)]
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => {
            if let std::borrow::Cow::Owned(r) = dso_secrets::redact::Redactor::global().redact(s) {
                *s = r;
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        serde_json::Value::Object(o) => o.values_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_events_in_order_with_increasing_seq() {
        let bus = Bus::new();
        let mut rx = bus.subscribe();
        bus.publish("a.one", serde_json::json!({"n": 1}));
        bus.publish("a.two", serde_json::json!({"n": 2}));
        let a = rx.recv().await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!((a.kind.as_str(), a.seq), ("a.one", 1));
        assert_eq!((b.kind.as_str(), b.seq), ("a.two", 2));
        assert_eq!(b.data["n"], 2);
    }
}
