//! The agent's event bus: one broadcast of what happens (rotation steps, secret changes,
//! provider health, Docker events of managed containers), read by `GET /v1/events`
//! (server-sent events, `dso watch`) and by the outgoing webhooks.
//!
//! Invariant: an event carries names, versions, container IDs and redacted errors, never a
//! secret value; every text field passes the redactor before it is published.
//!
//! Publishing never blocks and never fails: a subscriber that falls behind by more than
//! [`CAPACITY`] events loses the oldest ones and is told how many (`lagged`).
//!
//! The last [`REPLAY`] events are kept, so that a client reconnecting with
//! `Last-Event-ID` gets what it missed ([`Bus::subscribe_after`]). [`Bus::close`] at agent
//! shutdown ends every stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events a slow subscriber may fall behind before it loses the oldest.
pub const CAPACITY: usize = 1024;

/// Recent events kept for a client that reconnects with `Last-Event-ID`.
pub const REPLAY: usize = 256;

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
    /// The last [`REPLAY`] events. Publishing holds this lock while it sends, so that a
    /// subscriber taking the lock sees each event either here or on its receiver, once.
    recent: Mutex<VecDeque<Arc<Event>>>,
    closed: CancellationToken,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::new()
    }
}

impl Bus {
    /// A bus with no subscriber yet.
    pub fn new() -> Bus {
        let (tx, _) = broadcast::channel(CAPACITY);
        Bus {
            inner: Arc::new(Inner {
                tx,
                seq: AtomicU64::new(0),
                recent: Mutex::new(VecDeque::with_capacity(REPLAY)),
                closed: CancellationToken::new(),
            }),
        }
    }

    /// Publishes an event of `kind` with `data` (a JSON object; string fields pass the
    /// redactor). Returns the event's sequence number.
    pub fn publish(&self, kind: &str, mut data: serde_json::Value) -> u64 {
        redact(&mut data);
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut recent = self.recent();
        // Under the lock: sequence numbers reach every subscriber in order.
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event = Arc::new(Event {
            seq,
            unix_ms,
            kind: kind.to_owned(),
            data,
        });
        if recent.len() == REPLAY {
            recent.pop_front();
        }
        recent.push_back(Arc::clone(&event));
        // No subscriber is not an error: nobody is watching.
        let _ = self.inner.tx.send(event);
        seq
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.inner.tx.subscribe()
    }

    /// The kept events with a sequence number above `after` (oldest first) and a receiver
    /// of every later one: together each event exactly once. `None` when the oldest
    /// missed event is no longer kept (more than [`REPLAY`] were published since `after`,
    /// or `after` is from another agent run); the caller then says so and starts from now.
    pub fn subscribe_after(&self, after: u64) -> (Option<Vec<Arc<Event>>>, broadcast::Receiver<Arc<Event>>) {
        let recent = self.recent();
        let rx = self.inner.tx.subscribe();
        let last = self.inner.seq.load(Ordering::Relaxed);
        let missed: Vec<Arc<Event>> = recent.iter().filter(|e| e.seq > after).cloned().collect();
        let complete = after <= last && missed.first().map_or(after == last, |e| e.seq == after + 1);
        (complete.then_some(missed), rx)
    }

    /// Ends every stream ([`Bus::closed`] resolves): the agent is stopping.
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// Resolves once [`Bus::close`] was called.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Event>>> {
        self.inner.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs every string of `v` through the global redactor.
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

    #[tokio::test]
    async fn subscribe_after_replays_what_was_missed_then_continues() {
        let bus = Bus::new();
        for n in 1..=5 {
            bus.publish("a.n", serde_json::json!({ "n": n }));
        }
        let (missed, mut rx) = bus.subscribe_after(3);
        let seqs: Vec<u64> = missed.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        bus.publish("a.n", serde_json::json!({ "n": 6 }));
        assert_eq!(rx.recv().await.unwrap().seq, 6);
        // Up to date: nothing missed, and that is complete.
        assert_eq!(bus.subscribe_after(6).0.unwrap().len(), 0);
        // From the future (another agent run): not complete.
        assert!(bus.subscribe_after(99).0.is_none());
    }

    #[tokio::test]
    async fn subscribe_after_says_when_the_gap_is_no_longer_kept() {
        let bus = Bus::new();
        for n in 0..(REPLAY as u64 + 10) {
            bus.publish("a.n", serde_json::json!({ "n": n }));
        }
        assert!(bus.subscribe_after(5).0.is_none());
        let kept = bus.subscribe_after(20).0.unwrap();
        assert_eq!(kept.first().unwrap().seq, 21);
    }

    #[test]
    fn every_string_is_redacted() {
        let secret = "events-redaction-test-value-8d1f";
        let value = dso_secrets::SecretValue::from_slice(secret.as_bytes());
        dso_secrets::redact::Redactor::global().register(&value);
        let bus = Bus::new();
        let mut rx = bus.subscribe();
        bus.publish(
            "x.y",
            serde_json::json!({ "error": format!("bad {secret}"), "list": [secret] }),
        );
        let e = rx.try_recv().unwrap();
        let text = serde_json::to_string(&*e).unwrap();
        assert!(!text.contains(secret), "{text}");
        dso_secrets::redact::Redactor::global().forget(&value);
    }
}
