//! The control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! `server.rs` owns the socket (creation, permissions, peer checks) and hands each request,
//! body already read, to the [`Router`]. The router picks a module by path prefix; each
//! module (`proxy.rs`, `metrics.rs`) matches the rest of the path itself. A later module
//! (rotations, services) is one more `mount` line in [`Router::new`].

mod compose;
mod metrics;
mod peer;
mod proxy;
mod rotations;
mod secrets;
mod server;
pub mod vault;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use dso_proxy::Proxy;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use server::bind_with_group;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct State {
    /// The running proxy.
    pub proxy: Proxy,
    /// When the agent started, for `/v1/health`.
    pub started: Instant,
    /// The Docker side (`dso agent --docker`), for `/v1/rotations` and `/v1/services`.
    pub docker: Option<std::sync::Arc<crate::docker::Docker>>,
    /// The secret side, when the config has providers or secrets, for `/v1/secrets`.
    pub secrets: Option<std::sync::Arc<crate::secrets::Secrets>>,
    /// The agent's event bus, for `GET /v1/events`.
    #[allow(dead_code)] // Read once `GET /v1/events` lands (issue 11 work in progress).
    pub events: crate::events::Bus,
}

/// One request, body read, path split after the module's prefix.
#[derive(Debug)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path segments after the mount prefix, each percent-decoded (`shop%2Fweb%3A8080`
    /// is the listener `shop/web:8080`).
    pub path: Vec<String>,
    /// Query parameters.
    pub query: HashMap<String, String>,
    /// The whole body.
    pub body: Bytes,
}

impl ApiRequest {
    /// The path segments as `&str`, for matching.
    pub fn segments(&self) -> Vec<&str> {
        self.path.iter().map(String::as_str).collect()
    }

    /// The body as JSON of type `T`; an empty body reads as `{}`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
    }
}

/// An error answered as `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Lowercase message naming the field or the thing that was not found.
    pub message: String,
}

impl ApiError {
    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

/// What a handler returns.
pub type Reply = Result<Response<Full<Bytes>>, ApiError>;

/// A boxed handler future.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Option<Reply>> + Send>>;

/// A module's entry point: `None` when no route of the module matches the path.
pub type Handler = fn(State, ApiRequest) -> ReplyFuture;

/// Routes requests to modules by path prefix.
#[derive(Debug, Clone)]
pub struct Router {
    mounts: Vec<(&'static str, Handler)>,
}

impl Router {
    /// Every module of the API.
    pub fn new() -> Self {
        Router { mounts: Vec::new() }
            .mount("/v1/health", |s, r| Box::pin(health(s, r)))
            .mount("/v1/proxy", |s, r| Box::pin(proxy::handle(s, r)))
            .mount("/metrics", |s, r| Box::pin(metrics::handle(s, r)))
            .mount("/v1/rotations", |s, r| Box::pin(rotations::rotations(s, r)))
            .mount("/v1/services", |s, r| Box::pin(rotations::services(s, r)))
            .mount("/v1/delivery", |s, r| Box::pin(rotations::delivery(s, r)))
            .mount("/v1/secrets", |s, r| Box::pin(secrets::handle(s, r)))
            .mount("/v1/vault", |s, r| Box::pin(vault::handle(s, r)))
            .mount("/v1/compose", |s, r| Box::pin(compose::handle(s, r)))
    }

    /// Adds a module answering under `prefix`.
    pub fn mount(mut self, prefix: &'static str, handler: Handler) -> Self {
        self.mounts.push((prefix, handler));
        self
    }

    /// Answers one request.
    pub async fn route(
        &self,
        state: State,
        method: Method,
        path: &str,
        query: Option<&str>,
        body: Bytes,
    ) -> Reply {
        for (prefix, handler) in &self.mounts {
            let Some(rest) = path.strip_prefix(prefix) else {
                continue;
            };
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            let segments = rest
                .split('/')
                .filter(|s| !s.is_empty())
                .map(decode_segment)
                .collect::<Result<Vec<_>, _>>()?;
            let req = ApiRequest {
                method: method.clone(),
                path: segments,
                query: parse_query(query.unwrap_or("")),
                body: body.clone(),
            };
            if let Some(reply) = handler(state.clone(), req).await {
                return reply;
            }
        }
        Err(ApiError::not_found(format!(
            "no endpoint {method} {path}; see docs/api.md"
        )))
    }
}

impl Default for Router {
    fn default() -> Self {
        Router::new()
    }
}

async fn health(state: State, req: ApiRequest) -> Option<Reply> {
    if req.method != Method::GET || !req.path.is_empty() {
        return None;
    }
    Some(json(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "listeners": state.proxy.listeners().len(),
        }),
    ))
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut body = serde_json::to_vec_pretty(value).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("cannot encode response: {e}"),
    })?;
    body.push(b'\n');
    // Every answer passes the redactor: no handler has to remember that a value it did
    // not expect (an upstream error text) might carry a secret.
    let body = dso_secrets::Redactor::global().redact_bytes(&body).into_owned();
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid"))
}

/// The response for an error.
pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let message = dso_secrets::Redactor::global().redact(&e.message).into_owned();
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    Response::builder()
        .status(e.status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

/// Percent-decodes one path segment. Names may contain `/` (Compose listeners are
/// `project/service:port`), so clients encode each segment and the router decodes it after
/// splitting the path on `/`.
pub fn decode_segment(segment: &str) -> Result<String, ApiError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "path segment {segment:?}: `%` must be followed by two hex digits"
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("path segment {segment:?} is not UTF-8 once decoded")))
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            proxy: Proxy::new(dso_proxy::ProxyConfig::default()),
            started: Instant::now(),
            docker: None,
            secrets: None,
            events: crate::events::Bus::new(),
        }
    }

    async fn status(method: Method, path: &str, query: Option<&str>) -> StatusCode {
        match Router::new()
            .route(state(), method, path, query, Bytes::new())
            .await
        {
            Ok(r) => r.status(),
            Err(e) => e.status,
        }
    }

    #[tokio::test]
    async fn prefixes_match_whole_segments_only() {
        assert_eq!(status(Method::GET, "/v1/health", None).await, StatusCode::OK);
        assert_eq!(status(Method::GET, "/v1/proxy", None).await, StatusCode::OK);
        assert_eq!(status(Method::GET, "/v1/proxy/", None).await, StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/v1/proxyx", None).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(status(Method::GET, "/metrics", None).await, StatusCode::OK);
        assert_eq!(
            status(Method::POST, "/v1/health", None).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(Method::GET, "/v1/proxy/listeners/x", None).await,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(decode_segment("shop%2Fweb%3A8080").unwrap(), "shop/web:8080");
        assert_eq!(decode_segment("plain").unwrap(), "plain");
        assert!(decode_segment("bad%2").is_err());
        assert!(decode_segment("bad%zz").is_err());
        assert!(decode_segment("%ff").is_err(), "not UTF-8");
        let name = "p/s:1 ü%";
        assert_eq!(decode_segment(&crate::client::path_segment(name)).unwrap(), name);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Paths built from the API's own words, separators, escapes and arbitrary text.
        fn path() -> impl Strategy<Value = String> {
            let part = prop_oneof![
                Just("v1".to_owned()),
                Just("proxy".to_owned()),
                Just("listeners".to_owned()),
                Just("echo".to_owned()),
                Just("swap".to_owned()),
                Just("pause".to_owned()),
                Just("resume".to_owned()),
                Just("generations".to_owned()),
                Just("drain".to_owned()),
                Just("rotations".to_owned()),
                Just("services".to_owned()),
                Just("health".to_owned()),
                Just("metrics".to_owned()),
                Just("18446744073709551616".to_owned()),
                Just("%".to_owned()),
                Just("%2F".to_owned()),
                Just("%ff".to_owned()),
                ".{0,12}",
            ];
            proptest::collection::vec(part, 0..7).prop_map(|p| format!("/{}", p.join("/")))
        }

        /// JSON-ish bodies: real fields with odd values, and arbitrary bytes.
        fn body() -> impl Strategy<Value = Vec<u8>> {
            let value = prop_oneof![
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("[]".to_owned()),
                Just("{}".to_owned()),
                Just(r#""127.0.0.1:1""#.to_owned()),
                Just(r#""0.0.0.0:0""#.to_owned()),
                Just(r#""18446744073709551615s""#.to_owned()),
                Just(r#""1000d""#.to_owned()),
                Just(r#"["127.0.0.1:1", {"addr": "[::1]:2", "label": "x\u001b"}]"#.to_owned()),
                Just("-1".to_owned()),
                Just("1e400".to_owned()),
                "\\PC{0,10}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            ];
            let field = prop_oneof![
                Just("backends"),
                Just("drain"),
                Just("wait"),
                Just("max"),
                Just("target"),
                Just("strategy"),
                Just("env"),
                Just("other"),
            ];
            prop_oneof![
                proptest::collection::vec((field, value), 0..4).prop_map(|fields| {
                    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                    format!("{{{}}}", inner.join(", ")).into_bytes()
                }),
                proptest::collection::vec(any::<u8>(), 0..64),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// No request makes the router panic, and every answer is a status the API
            /// documents, errors with a message.
            #[test]
            fn any_request_gets_a_documented_answer(
                post in any::<bool>(),
                path in path(),
                query in proptest::option::of("[a-z=&%0-9]{0,16}"),
                body in body(),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let method = if post { Method::POST } else { Method::GET };
                // Short drains and holds only: a long wait would only slow the test down.
                let query = query.map(|q| q.replace("timeout", "t"));
                let reply = rt.block_on(async {
                    let state = state();
                    let l = dso_proxy::ListenerConfig::new("echo", "127.0.0.1:0".parse().unwrap(), vec![]);
                    state.proxy.add_listener(l).unwrap();
                    tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        Router::new().route(state, method, &path, query.as_deref(), Bytes::from(body)),
                    )
                    .await
                });
                let Ok(reply) = reply else {
                    // A swap with wait, or a drain wait: legal, just slow.
                    return Ok(());
                };
                let status = match reply {
                    Ok(r) => r.status(),
                    Err(e) => {
                        prop_assert!(!e.message.is_empty());
                        e.status
                    }
                };
                prop_assert!(
                    [200, 202, 400, 404, 409].contains(&status.as_u16()),
                    "{status} for {path}"
                );
            }
        }
    }

    #[test]
    fn query_pairs() {
        let q = parse_query("timeout=30s&x&&y=1");
        assert_eq!(q.get("timeout").map(String::as_str), Some("30s"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
        assert_eq!(q.len(), 3);
    }
}
