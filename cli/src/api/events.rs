//! `GET /v1/events`: the event bus as server-sent events (`text/event-stream`).
//!
//! Each event is one frame: `id: SEQ`, `event: KIND`, `data: JSON of the whole event`
//! (`{"seq", "unix_ms", "kind", "data"}`, one line), then a blank line. A comment line
//! (`: keep-alive`) goes out after [`KEEPALIVE`] without an event, so proxies and idle
//! timeouts keep the connection. A subscriber that fell behind gets `event: lagged` with
//! `{"missed": N}` and continues with the next event. `Last-Event-ID` replays the kept
//! events after that ID (see [`Bus::subscribe_after`]); when they are no longer kept, the
//! stream starts with `event: lagged` and `{"missed": null, "after": ID}`. The body ends when
//! the agent stops ([`Bus::close`]).
//!
//! Independent of the router: [`stream`] takes the bus, the raw query and the header and
//! returns a response whose body is a stream of frames, for hyper or axum alike.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::broadcast::{self, error::RecvError};

use super::ApiError;
use crate::events::{Bus, Event};

/// Longest time without a byte on the stream: then a comment line goes out.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// The body of `GET /v1/events`: frames as they happen.
pub type SseBody = StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>>;

/// Which kinds a client asked for (`?kinds=rotation,secret.changed`): a kind matches a
/// prefix equal to it or to its leading dotted parts (`rotation` matches `rotation.step`,
/// not `rotations.x`). Empty: every kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kinds(Vec<String>);

impl Kinds {
    /// Parses the comma-separated list; each prefix is made of `a-z`, `0-9`, `_` and `.`.
    pub fn parse(list: &str) -> Result<Kinds, ApiError> {
        let mut out = Vec::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let p = p.trim_end_matches('.');
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
            {
                return Err(ApiError::bad_request(format!(
                    "kinds: {p:?} is not a kind prefix (letters a-z, digits, `_` and `.`, e.g. `rotation` or `secret.changed`); see docs/api.md"
                )));
            }
            out.push(p.to_owned());
        }
        Ok(Kinds(out))
    }

    /// Whether `kind` is asked for.
    pub fn matches(&self, kind: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|p| {
                kind.strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
    }
}

/// The SSE frame of one event. The JSON is one line (no newline inside), passed through
/// the redactor once more like every API answer.
pub fn frame(e: &Event) -> Bytes {
    let json = serde_json::to_string(e).unwrap_or_else(|_| "{}".to_owned());
    let text = format!("id: {}\nevent: {}\ndata: {json}\n\n", e.seq, e.kind);
    Bytes::from(
        dso_secrets::Redactor::global()
            .redact_bytes(text.as_bytes())
            .into_owned(),
    )
}

/// The `lagged` frame: `missed` events were lost (`None`: unknown how many, after a
/// `Last-Event-ID` older than the kept events).
pub fn lagged_frame(missed: Option<u64>, after: Option<u64>) -> Bytes {
    let mut data = serde_json::json!({ "missed": missed });
    if let Some(a) = after {
        data["after"] = a.into();
    }
    Bytes::from(format!("event: lagged\ndata: {data}\n\n"))
}

/// The keep-alive comment.
pub const KEEPALIVE_FRAME: &[u8] = b": keep-alive\n\n";

/// `GET /v1/events[?kinds=...]`: the response streaming the bus. `query` is the raw
/// query string; `last_event_id` the `Last-Event-ID` header, when sent. A bad `kinds` or
/// `Last-Event-ID` is a 400 naming it.
pub fn stream(
    bus: &Bus,
    query: Option<&str>,
    last_event_id: Option<&str>,
) -> Result<Response<SseBody>, ApiError> {
    stream_with(bus, query, last_event_id, KEEPALIVE)
}

/// [`stream`] with the keep-alive period given.
fn stream_with(
    bus: &Bus,
    query: Option<&str>,
    last_event_id: Option<&str>,
    keepalive: Duration,
) -> Result<Response<SseBody>, ApiError> {
    let mut kinds = Kinds::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "kinds" => kinds = Kinds::parse(&super::decode_segment(v)?)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} for GET /v1/events; the one known is `kinds`"
                )));
            }
        }
    }
    let mut pending = VecDeque::new();
    let rx = match last_event_id.map(str::trim).filter(|s| !s.is_empty()) {
        None => bus.subscribe(),
        Some(id) => {
            let after: u64 = id.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "Last-Event-ID: {id:?} is not an event sequence number (the `id:` of a frame)"
                ))
            })?;
            let (missed, rx) = bus.subscribe_after(after);
            match missed {
                Some(events) => {
                    pending.extend(events.iter().filter(|e| kinds.matches(&e.kind)).map(|e| frame(e)))
                }
                None => pending.push_back(lagged_frame(None, Some(after))),
            }
            rx
        }
    };
    let state = Sse {
        rx,
        bus: bus.clone(),
        kinds,
        pending,
        keepalive,
    };
    let frames = futures_util::stream::unfold(state, |mut s| async move {
        let bytes = s.next().await?;
        Some((Ok(Frame::data(bytes)), s))
    });
    let body: SseBody = StreamBody::new(Box::pin(frames));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .expect("static headers are valid"))
}

/// One client's stream.
struct Sse {
    rx: broadcast::Receiver<Arc<Event>>,
    bus: Bus,
    kinds: Kinds,
    pending: VecDeque<Bytes>,
    keepalive: Duration,
}

impl Sse {
    /// The next frame; `None` once the agent stops.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(b) = self.pending.pop_front() {
            return Some(b);
        }
        loop {
            let got = tokio::select! {
                biased;
                () = self.bus.closed() => return None,
                r = tokio::time::timeout(self.keepalive, self.rx.recv()) => r,
            };
            match got {
                Err(_elapsed) => return Some(Bytes::from_static(KEEPALIVE_FRAME)),
                Ok(Ok(e)) if self.kinds.matches(&e.kind) => return Some(frame(&e)),
                Ok(Ok(_)) => continue,
                Ok(Err(RecvError::Lagged(n))) => return Some(lagged_frame(Some(n), None)),
                Ok(Err(RecvError::Closed)) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn next_frame(body: &mut SseBody) -> String {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame within 5 s")
            .expect("the stream goes on")
            .unwrap();
        String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn a_frame_is_id_event_and_one_line_of_json() {
        let e = Event {
            seq: 7,
            unix_ms: 1_700_000_000_000,
            kind: "rotation.step".into(),
            data: serde_json::json!({ "detail": "two\nlines", "service": "shop/web" }),
        };
        let text = String::from_utf8(frame(&e).to_vec()).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "id: 7");
        assert_eq!(lines[1], "event: rotation.step");
        let json = lines[2].strip_prefix("data: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["kind"], "rotation.step");
        assert_eq!(v["data"]["detail"], "two\nlines");
        assert_eq!(&lines[3..], ["", ""], "{text:?}");
    }

    #[test]
    fn kinds_match_whole_dotted_prefixes() {
        let k = Kinds::parse("rotation, secret.changed,").unwrap();
        assert!(k.matches("rotation.step"));
        assert!(k.matches("rotation"));
        assert!(k.matches("secret.changed"));
        assert!(!k.matches("secret.other"));
        assert!(!k.matches("rotations.step"));
        assert!(!k.matches("provider.down"));
        assert!(Kinds::parse("").unwrap().matches("anything.at.all"));
        let e = Kinds::parse("rotation,Bad Kind").unwrap_err();
        assert!(e.message.contains("\"Bad Kind\""), "{}", e.message);
    }

    #[tokio::test]
    async fn the_stream_filters_reports_lag_and_ends_when_the_bus_closes() {
        let bus = Bus::new();
        let resp = stream(&bus, Some("kinds=rotation%2Cprovider.up"), None).unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache");
        let mut body = resp.into_body();
        bus.publish("secret.changed", serde_json::json!({}));
        bus.publish("rotation.started", serde_json::json!({ "id": "1" }));
        bus.publish("provider.up", serde_json::json!({ "provider": "v" }));
        let a = next_frame(&mut body).await;
        assert!(a.starts_with("id: 2\nevent: rotation.started\n"), "{a}");
        let b = next_frame(&mut body).await;
        assert!(b.starts_with("id: 3\nevent: provider.up\n"), "{b}");
        // Overflow the subscriber: it hears how many it lost, then the next event.
        for _ in 0..(crate::events::CAPACITY + 5) {
            bus.publish("rotation.step", serde_json::json!({}));
        }
        let lag = next_frame(&mut body).await;
        assert_eq!(lag, "event: lagged\ndata: {\"missed\":5}\n\n");
        let next = next_frame(&mut body).await;
        assert!(next.contains("event: rotation.step"), "{next}");
        bus.close();
        // What is buffered may still come; then the body ends.
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(f) = body.frame().await {
                f.unwrap();
            }
        })
        .await;
        assert!(end.is_ok(), "the body ends once the bus closes");
    }

    #[tokio::test]
    async fn last_event_id_replays_then_streams() {
        let bus = Bus::new();
        for _ in 0..3 {
            bus.publish("secret.changed", serde_json::json!({}));
        }
        let mut body = stream(&bus, None, Some("1")).unwrap().into_body();
        assert!(next_frame(&mut body).await.starts_with("id: 2\n"));
        assert!(next_frame(&mut body).await.starts_with("id: 3\n"));
        bus.publish("provider.down", serde_json::json!({ "error": "x" }));
        assert!(
            next_frame(&mut body)
                .await
                .starts_with("id: 4\nevent: provider.down\n")
        );
        // An ID from another agent run: said, then live.
        let mut body = stream(&bus, None, Some("1000")).unwrap().into_body();
        let lag = next_frame(&mut body).await;
        let data: serde_json::Value =
            serde_json::from_str(lag.strip_prefix("event: lagged\ndata: ").unwrap().trim_end()).unwrap();
        assert_eq!(data, serde_json::json!({ "missed": null, "after": 1000 }));
        assert!(stream(&bus, None, Some("abc")).is_err());
        assert!(stream(&bus, Some("since=3"), None).is_err());
    }

    #[tokio::test]
    async fn a_quiet_stream_sends_keep_alive_comments() {
        let bus = Bus::new();
        let period = Duration::from_millis(200);
        let mut body = stream_with(&bus, None, None, period).unwrap().into_body();
        let started = std::time::Instant::now();
        assert_eq!(next_frame(&mut body).await, ": keep-alive\n\n");
        assert!(started.elapsed() >= period);
        // An event in between: it comes, and the period starts again.
        bus.publish("a.b", serde_json::json!({}));
        assert!(next_frame(&mut body).await.starts_with("id: 1\n"));
        assert_eq!(next_frame(&mut body).await, ": keep-alive\n\n");
    }
}
