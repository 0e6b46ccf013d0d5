//! Outgoing webhooks (`agent.notify.webhooks`): matching events of the bus POSTed as the
//! event's JSON, signed, retried with backoff.
//!
//! Signature (the scheme `POST /v1/webhook` verifies for incoming requests; docs/api.md
//! describes it once): `X-DSO-Timestamp: <Unix seconds>` and
//! `X-DSO-Signature: sha256=<lowercase hex HMAC-SHA256(key, "<timestamp>.<body>")>`, the
//! key being the bytes of `secret_file` without trailing newline characters. Each attempt is
//! signed again with its own timestamp, so a receiver can keep a short replay window.
//!
//! Retries ([`Policy`]): a 2xx is delivered; a 4xx is given up at once (the receiver refuses
//! this request, sending it again changes nothing) except 408 and 429; 408, 429, 5xx,
//! timeouts and connection errors are retried after 0.5 s, 1 s, 2 s... capped at 30 s
//! (429's `Retry-After` honoured up to the cap), `max_attempts` in all. Redirects are not
//! followed (one to `http://` would bypass the https rule).
//!
//! A slow receiver never blocks the bus: each webhook has its own task and a queue of
//! [`QUEUE`] events; an event arriving to a full queue is dropped, counted and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use dso_secrets::SecretValue;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::events::Kinds;
use crate::config::WebhookSettings;
use crate::events::{Bus, Event};

/// Events waiting per webhook before new ones are dropped.
pub const QUEUE: usize = 256;

/// When an attempt is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each later one.
    pub base: Duration,
    /// Longest wait between two attempts.
    pub cap: Duration,
}

impl Policy {
    /// The agent's policy with `max_attempts`.
    pub fn new(max_attempts: u32) -> Policy {
        Policy {
            max_attempts,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// What an attempt's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Done,
    /// Given up: sending it again would be refused again.
    GiveUp,
    /// Worth another attempt (after at least this long, when the receiver said).
    Retry(Option<Duration>),
}

/// The verdict of an HTTP status (and `Retry-After`, for 429).
pub fn verdict(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        200..=299 => Verdict::Done,
        408 => Verdict::Retry(None),
        429 => Verdict::Retry(retry_after),
        400..=499 => Verdict::GiveUp,
        // 5xx, and the odd 1xx/3xx (redirects are not followed): the receiver is not
        // answering as it should yet.
        _ => Verdict::Retry(None),
    }
}

/// Lowercase hex HMAC-SHA256 of `message` under `key`.
pub fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `X-DSO-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn signature(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    format!("sha256={}", hmac_hex(key, &message))
}

/// One configured webhook, ready to send.
struct Webhook {
    url: reqwest::Url,
    /// What the log names: scheme, host and path (a query may carry a token).
    shown: String,
    key: SecretValue,
    kinds: Kinds,
    policy: Policy,
    client: reqwest::Client,
    dropped: AtomicU64,
}

/// Reads each webhook's key and starts its task; returns how many run. A key file that
/// cannot be read, or is empty, is an error naming the key of the config.
pub fn start(settings: &[WebhookSettings], bus: &Bus, stop: CancellationToken) -> anyhow::Result<usize> {
    for (i, s) in settings.iter().enumerate() {
        let hook = Webhook::new(s, i)?;
        info!(url = %hook.shown, events = ?s.events, "webhook notifications on");
        spawn(Arc::new(hook), bus, stop.clone());
    }
    Ok(settings.len())
}

impl Webhook {
    fn new(s: &WebhookSettings, i: usize) -> anyhow::Result<Webhook> {
        let key_name = format!("agent.notify.webhooks[{i}].secret_file");
        let mut bytes = std::fs::read(&s.secret_file)
            .with_context(|| format!("{key_name}: cannot read {}", s.secret_file.display()))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        let key = SecretValue::new(bytes);
        if key.is_empty() {
            anyhow::bail!(
                "{key_name}: {} is empty; put the signing key in it (e.g. `head -c 32 /dev/urandom | base64`)",
                s.secret_file.display()
            );
        }
        dso_secrets::Redactor::global().register(&key);
        let url = reqwest::Url::parse(&s.url).with_context(|| format!("agent.notify.webhooks[{i}].url"))?;
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dso/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the webhook HTTP client")?;
        Ok(Webhook {
            shown: format!(
                "{}://{}{}",
                url.scheme(),
                url.host_str().unwrap_or(""),
                url.path()
            ),
            url,
            key,
            kinds: Kinds::parse(&s.events.join(",")).map_err(|e| anyhow::anyhow!("{}", e.message))?,
            policy: Policy::new(s.max_attempts),
            client,
            dropped: AtomicU64::new(0),
        })
    }

    /// Sends one event with retries; returns the attempts made and whether it arrived.
    async fn deliver(&self, e: &Event, stop: &CancellationToken) -> (u32, bool) {
        let body = serde_json::to_vec(e).unwrap_or_default();
        let body = hyper::body::Bytes::from(dso_secrets::Redactor::global().redact_bytes(&body).into_owned());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let sent = self
                .client
                .post(self.url.clone())
                .header("content-type", "application/json")
                .header("x-dso-event", e.kind.as_str())
                .header("x-dso-timestamp", timestamp.to_string())
                .header("x-dso-signature", signature(self.key.expose(), timestamp, &body))
                .body(body.clone())
                .send()
                .await;
            let (v, why) = match sent {
                Ok(r) => {
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    (
                        verdict(r.status().as_u16(), retry_after),
                        format!("HTTP {}", r.status()),
                    )
                }
                // Never the URL's query: reqwest's error text names the URL.
                Err(err) => (Verdict::Retry(None), describe(&err)),
            };
            match v {
                Verdict::Done => {
                    debug!(url = %self.shown, kind = %e.kind, seq = e.seq, attempt, "webhook delivered");
                    return (attempt, true);
                }
                Verdict::GiveUp => {
                    warn!(url = %self.shown, kind = %e.kind, seq = e.seq, answer = %why, "webhook refused the event (4xx); not retried");
                    return (attempt, false);
                }
                Verdict::Retry(_) if attempt >= self.policy.max_attempts => {
                    warn!(url = %self.shown, kind = %e.kind, seq = e.seq, attempts = attempt, answer = %why, "webhook given up after the last attempt");
                    return (attempt, false);
                }
                Verdict::Retry(after) => {
                    let wait = after
                        .unwrap_or_default()
                        .max(self.policy.backoff(attempt))
                        .min(self.policy.cap);
                    debug!(url = %self.shown, kind = %e.kind, attempt, answer = %why, retry_in = ?wait, "webhook attempt failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return (attempt, false),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// A transport error in words, without the URL (whose query may carry a token).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}

/// The webhook's two tasks: one moves matching events from the bus into the queue
/// (never waiting), one sends them in order.
fn spawn(hook: Arc<Webhook>, bus: &Bus, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = mpsc::channel::<Arc<Event>>(QUEUE);
    let mut events = bus.subscribe();
    let feeder = Arc::clone(&hook);
    let feed_stop = stop.clone();
    tokio::spawn(async move {
        let drop_one = |n: u64| {
            let total = feeder.dropped.fetch_add(n, Ordering::Relaxed) + n;
            // The first drop, then every 100th: a stuck receiver does not flood the log.
            if total == n || total / 100 != (total - n) / 100 {
                warn!(url = %feeder.shown, dropped_total = total, "webhook queue full (the receiver is slow or down); events dropped");
            }
        };
        loop {
            let e = tokio::select! {
                () = feed_stop.cancelled() => return,
                e = events.recv() => e,
            };
            match e {
                Ok(e) if feeder.kinds.matches(&e.kind) => {
                    if tx.try_send(e).is_err() {
                        drop_one(1);
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => drop_one(n),
                Err(RecvError::Closed) => return,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let e = tokio::select! {
                () = stop.cancelled() => return,
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            hook.deliver(&e, &stop).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // `printf '%s.%s' 1700000000 '{}' | openssl dgst -sha256 -hmac Jefe`
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, b"{}"),
            "sha256=d3793e2b4103edfbd98cc19591832f5fad701d413db9fcae0ae7dab8184ed207"
        );
    }

    #[test]
    fn four_hundreds_are_final_except_408_and_429() {
        assert_eq!(verdict(200, None), Verdict::Done);
        assert_eq!(verdict(204, None), Verdict::Done);
        assert_eq!(verdict(400, None), Verdict::GiveUp);
        assert_eq!(verdict(401, None), Verdict::GiveUp);
        assert_eq!(verdict(404, None), Verdict::GiveUp);
        assert_eq!(verdict(408, None), Verdict::Retry(None));
        let ra = Some(Duration::from_secs(3));
        assert_eq!(verdict(429, ra), Verdict::Retry(ra));
        assert_eq!(verdict(500, None), Verdict::Retry(None));
        assert_eq!(verdict(503, None), Verdict::Retry(None));
        assert_eq!(verdict(302, None), Verdict::Retry(None));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = Policy::new(5);
        let waits: Vec<u64> = (1..=8).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(p.backoff(200), p.cap);
    }

    /// What the in-process receiver saw: per request, its headers and body.
    type Seen = Arc<Mutex<Vec<(hyper::HeaderMap, Vec<u8>)>>>;

    /// An HTTP server on 127.0.0.1:0 answering every POST with `status` after `delay`.
    async fn receiver(status: u16, delay: Duration) -> (String, Seen) {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook?token=t0ken", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let s = Arc::clone(&s);
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes().to_vec();
                                s.lock().unwrap().push((parts.headers, body));
                                tokio::time::sleep(delay).await;
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, seen)
    }

    fn hook(url: &str, key: &[u8], events: &str, policy: Policy) -> Arc<Webhook> {
        let url = reqwest::Url::parse(url).unwrap();
        Arc::new(Webhook {
            shown: url.to_string(),
            url,
            key: SecretValue::from_slice(key),
            kinds: Kinds::parse(events).unwrap(),
            policy,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            dropped: AtomicU64::new(0),
        })
    }

    fn quick(max_attempts: u32) -> Policy {
        Policy {
            max_attempts,
            base: Duration::from_millis(20),
            cap: Duration::from_millis(50),
        }
    }

    fn event(kind: &str) -> Event {
        Event {
            seq: 4,
            unix_ms: 1,
            kind: kind.to_owned(),
            data: serde_json::json!({ "service": "shop/web" }),
        }
    }

    #[tokio::test]
    async fn a_delivery_is_signed_over_timestamp_and_body() {
        let (url, seen) = receiver(204, Duration::ZERO).await;
        let h = hook(&url, b"k3y", "rotation", quick(3));
        let (attempts, ok) = h
            .deliver(&event("rotation.succeeded"), &CancellationToken::new())
            .await;
        assert_eq!((attempts, ok), (1, true));
        let seen = seen.lock().unwrap();
        let (headers, body) = &seen[0];
        let ts: u64 = headers["x-dso-timestamp"].to_str().unwrap().parse().unwrap();
        assert_eq!(
            headers["x-dso-signature"].to_str().unwrap(),
            signature(b"k3y", ts, body)
        );
        assert_eq!(headers["x-dso-event"], "rotation.succeeded");
        assert_eq!(headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["kind"], "rotation.succeeded");
        assert_eq!(v["seq"], 4);
        assert_eq!(v["data"]["service"], "shop/web");
    }

    #[tokio::test]
    async fn a_400_gets_one_attempt_a_500_every_attempt_within_the_backoff_bound() {
        let (url, seen) = receiver(400, Duration::ZERO).await;
        let h = hook(&url, b"k", "rotation", quick(4));
        assert_eq!(
            h.deliver(&event("rotation.failed"), &CancellationToken::new())
                .await,
            (1, false)
        );
        assert_eq!(seen.lock().unwrap().len(), 1);

        let (url, seen) = receiver(500, Duration::ZERO).await;
        let h = hook(&url, b"k", "rotation", quick(4));
        let t = std::time::Instant::now();
        assert_eq!(
            h.deliver(&event("rotation.failed"), &CancellationToken::new())
                .await,
            (4, false)
        );
        let took = t.elapsed();
        assert_eq!(seen.lock().unwrap().len(), 4);
        // Waits 20 + 40 + 50 (capped) ms between the four attempts.
        assert!(took >= Duration::from_millis(110), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");

        let (url, seen) = receiver(429, Duration::ZERO).await;
        let h = hook(&url, b"k", "rotation", quick(2));
        assert_eq!(
            h.deliver(&event("rotation.failed"), &CancellationToken::new())
                .await,
            (2, false)
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn connection_errors_are_retried() {
        // A port nothing listens on: bound, then closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let h = hook(&format!("http://{addr}/"), b"k", "rotation", quick(3));
        assert_eq!(
            h.deliver(&event("rotation.failed"), &CancellationToken::new())
                .await,
            (3, false)
        );
    }

    #[tokio::test]
    async fn a_slow_receiver_never_blocks_the_bus_and_drops_are_counted() {
        let (url, seen) = receiver(200, Duration::from_secs(30)).await;
        let h = hook(&url, b"k", "rotation.succeeded", quick(1));
        let bus = Bus::new();
        let stop = CancellationToken::new();
        spawn(Arc::clone(&h), &bus, stop.clone());
        // One event in flight at the receiver, which holds it for 30 s.
        bus.publish("rotation.succeeded", serde_json::json!({}));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
        let t = std::time::Instant::now();
        let n = QUEUE as u64 + 50;
        for _ in 0..n {
            bus.publish("rotation.succeeded", serde_json::json!({}));
            bus.publish("rotation.step", serde_json::json!({}));
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "publishing waited on the receiver"
        );
        // QUEUE events wait, the rest are dropped; kinds that do not match are not queued.
        let want = n - QUEUE as u64;
        while h.dropped.load(Ordering::Relaxed) < want && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.dropped.load(Ordering::Relaxed), want);
        assert_eq!(seen.lock().unwrap().len(), 1);
        stop.cancel();
    }
}
