//! The control API: HTTP/1.1 + JSON, one axum [`router`] served on two listeners.
//!
//! - `server.rs` owns the Unix socket (creation, 0660 and group, SO_PEERCRED checks in
//!   `peer.rs`, the connection cap with eviction, header and idle timeouts) and serves each
//!   accepted connection with hyper's HTTP/1.1 builder around the router.
//! - `http.rs` serves the same router on TCP (`agent.http.listen`, default
//!   `127.0.0.1:8471`), where only [`http::PUBLIC`] paths are reachable (`/health`,
//!   `/metrics`, `/v1/events`, `/v1/webhook`); every other path answers 404 there.
//! - [`dispatch`] is the one way into the router for both: it checks the path's escapes,
//!   drops empty segments (`/v1/proxy/` is `/v1/proxy`), reads the body up to [`MAX_BODY`]
//!   (413 beyond), puts the caller's [`Peer`] into the request's extensions and logs the
//!   answer.
//!
//! Handlers are axum handlers: `extract::State<State>`, [`Params`] (path parameters,
//! percent-decoded: a listener `shop/web:8080` is sent as `shop%2Fweb%3A8080` and arrives as
//! one parameter), `RawQuery` read by [`parse_query`], the body as `Bytes` read by
//! [`parse_json`]. They answer [`Reply`]; an [`ApiError`] becomes `{"error": "..."}` with
//! its status. A path or method nobody serves is a 404 naming docs/api.md.
//!
//! # Old-style modules
//!
//! A module written against the earlier hand-written router, an entry point
//! `fn(State, ApiRequest) -> ReplyFuture` that matches its own segments and answers `None`
//! when nothing matches, is mounted under a prefix with one line in [`router`]:
//!
//! ```ignore
//! .merge(legacy("/v1/compose", |s, r| Box::pin(compose::handle(s, r))))
//! ```
//!
//! It then receives every method on the prefix and below, with [`ApiRequest::path`] the
//! decoded segments after the prefix, the query and the whole body; `None` answers the
//! router's 404.

mod compose;
mod config;
pub mod events;
pub mod health;
pub mod http;
mod metrics;
mod peer;
mod proxy;
mod rotations;
mod secrets;
mod server;
pub mod upgrade;
pub mod vault;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use axum::extract::{FromRequestParts, RawPathParams, RawQuery};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use dso_proxy::Proxy;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

pub use server::bind_with_group;
pub use server::inherit;

/// Largest request body accepted: a local vault value (`PUT /v1/vault/secrets/{name}`) at
/// its size limit; beyond it the answer is 413.
pub const MAX_BODY: usize = dso_secrets::value::MAX_VALUE_LEN;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct State {
    /// The running proxy.
    pub proxy: Proxy,
    /// When the agent started, for `/v1/health`.
    pub started: Instant,
    /// The Docker side (off with `dso agent --no-docker`; it may start after the API, once
    /// the engine answers), for `/v1/rotations`, `/v1/services` and `/v1/health`.
    pub docker: crate::docker::DockerSlot,
    /// The secret side, when the config has providers or secrets, for `/v1/secrets`.
    pub secrets: Option<std::sync::Arc<crate::secrets::Secrets>>,
    /// The agent's event bus, for `GET /v1/events`.
    pub events: crate::events::Bus,
}

/// Who sent a request, in its extensions (`Extension<Peer>`), set per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on the Unix socket, as SO_PEERCRED reported it (already allowed).
    Local {
        /// Its uid.
        uid: u32,
        /// Its primary gid.
        gid: u32,
        /// Its pid, when the kernel gave one.
        pid: Option<i32>,
    },
    /// A client of the HTTP listener.
    Tcp(SocketAddr),
}

/// The router: every endpoint of the API, for both listeners (the HTTP listener lets only
/// [`http::PUBLIC`] paths through). Serve it through [`dispatch`].
pub fn router() -> axum::Router<State> {
    axum::Router::new()
        .route("/health", get(health::health))
        .route("/v1/health", get(v1_health))
        .route("/metrics", get(metrics_text))
        .route("/v1/events", get(events_stream))
        .route("/v1/webhook", post(webhook::receive))
        .route("/v1/proxy", get(proxy::snapshot))
        .route("/v1/proxy/listeners", get(proxy::listeners))
        .route("/v1/proxy/listeners/{name}", get(proxy::listener))
        .route("/v1/proxy/listeners/{name}/swap", post(proxy::swap))
        .route("/v1/proxy/listeners/{name}/pause", post(proxy::pause))
        .route("/v1/proxy/listeners/{name}/resume", post(proxy::resume))
        .route(
            "/v1/proxy/listeners/{name}/generations/{n}/drain",
            get(proxy::drain),
        )
        .route("/v1/rotations", get(rotations::list).post(rotations::submit))
        .route("/v1/rotations/{id}", get(rotations::get))
        .route("/v1/services", get(rotations::services))
        .route("/v1/delivery", get(rotations::delivery))
        .route("/v1/secrets", get(secrets::status))
        .route("/v1/secrets/notify", post(secrets::notify))
        .route("/v1/agent/upgrade", post(upgrade::upgrade))
        .route("/v1/vault/secrets", get(vault::list))
        .route(
            "/v1/vault/secrets/{*name}",
            get(vault::get).put(vault::set).delete(vault::delete),
        )
        .route("/v1/config/reload", post(config::reload))
        // Old-style modules: `.merge(legacy("/v1/PREFIX", |s, r| Box::pin(module::handle(s, r))))`.
        .merge(legacy("/v1/compose", |s, r| Box::pin(compose::handle(s, r))))
        .fallback(no_endpoint)
        .method_not_allowed_fallback(no_endpoint)
        // The body is read and limited by `dispatch` already.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Answers one request with `app` (the [`router`] with its state): path escapes checked,
/// empty segments dropped, body read up to [`MAX_BODY`], `peer` in the extensions.
pub async fn dispatch<B>(app: axum::Router, peer: Peer, req: Request<B>) -> Response<axum::body::Body>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (mut parts, body) = req.into_parts();
    let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());
    let answer = match prepare(&mut parts, body).await {
        Ok(body) => {
            parts.extensions.insert(peer);
            let req = Request::from_parts(parts, axum::body::Body::from(body));
            // The router is always ready and never fails.
            let r = tower_call(app, req).await;
            debug!(%method, %path, status = %r.status(), "control request");
            return r;
        }
        Err(e) => e,
    };
    debug!(%method, %path, status = %answer.status, error = %answer.message, "control request refused");
    answer.into_response()
}

async fn tower_call(app: axum::Router, req: Request<axum::body::Body>) -> Response<axum::body::Body> {
    use hyper::service::Service as _;
    let svc = hyper_util::service::TowerToHyperService::new(app);
    match svc.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Checks and normalizes the path, and reads the body within the limit.
async fn prepare<B>(parts: &mut Parts, body: B) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let path = parts.uri.path();
    for segment in path.split('/') {
        decode_segment(segment)?;
    }
    if path.split('/').skip(1).any(str::is_empty) {
        let clean: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut target = format!("/{}", clean.join("/"));
        if let Some(q) = parts.uri.query() {
            target.push('?');
            target.push_str(q);
        }
        parts.uri = target
            .parse::<Uri>()
            .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))?;
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body larger than {MAX_BODY} bytes, the limit; nothing was changed"),
        }),
        Err(e) => Err(ApiError::bad_request(format!("cannot read body: {e}"))),
    }
}

async fn no_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint {method} {}; see docs/api.md", uri.path()))
}

/// The path parameters of the route, in order, percent-decoded.
#[derive(Debug)]
pub struct Params(pub Vec<String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Params(raw.iter().map(|(_, v)| v.to_owned()).collect()))
    }
}

impl Params {
    /// The first parameter (every route with `Params` has one).
    pub fn first(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }
}

/// One request, body read, path split after the module's prefix: what an old-style module
/// handler ([`Handler`], mounted with [`legacy`]) receives.
#[derive(Debug)]
#[allow(dead_code)] // Read by old-style modules the lead mounts through `legacy`.
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

#[allow(dead_code)] // Used by old-style modules the lead mounts through `legacy`.
impl ApiRequest {
    /// The path segments as `&str`, for matching.
    pub fn segments(&self) -> Vec<&str> {
        self.path.iter().map(String::as_str).collect()
    }

    /// The body as JSON of type `T`; an empty body reads as `{}`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.body)
    }
}

/// A body as JSON of type `T`; an empty (or all-blank) body reads as `{}`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
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

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        debug!(status = %self.status, error = %self.message, "control request failed");
        error_response(&self).into_response()
    }
}

/// What a handler returns.
pub type Reply = Result<Response<Full<Bytes>>, ApiError>;

/// A boxed old-style handler future.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Option<Reply>> + Send>>;

/// An old-style module's entry point: `None` when no route of the module matches the path.
pub type Handler = fn(State, ApiRequest) -> ReplyFuture;

/// Mounts an old-style module `handler` at `prefix` and below (every method), for
/// `.merge(...)` into [`router`]. `prefix` starts with `/` and does not end with one.
pub fn legacy(prefix: &'static str, handler: Handler) -> axum::Router<State> {
    let call = move |axum::extract::State(state): axum::extract::State<State>,
                     method: Method,
                     uri: Uri,
                     RawQuery(query): RawQuery,
                     body: Bytes| async move {
        let rest = uri.path().strip_prefix(prefix).unwrap_or("");
        let path = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decode_segment)
            .collect::<Result<Vec<_>, _>>()?;
        let req = ApiRequest {
            method: method.clone(),
            path,
            query: parse_query(query.as_deref().unwrap_or("")),
            body,
        };
        match handler(state, req).await {
            Some(reply) => reply,
            None => Err(ApiError::not_found(format!(
                "no endpoint {method} {}; see docs/api.md",
                uri.path()
            ))),
        }
    };
    axum::Router::new()
        .route(prefix, axum::routing::any(call))
        .route(&format!("{prefix}/{{*rest}}"), axum::routing::any(call))
}

async fn v1_health(axum::extract::State(state): axum::extract::State<State>) -> Reply {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_ms": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "listeners": state.proxy.listeners().len(),
            "docker": state.docker.health(),
        }),
    )
}

/// `GET /v1/events`: the bus as server-sent events (`events.rs`).
async fn events_stream(
    axum::extract::State(state): axum::extract::State<State>,
    uri: Uri,
    headers: hyper::HeaderMap,
) -> Result<Response<axum::body::Body>, ApiError> {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let r = events::stream(&state.events, uri.query(), last)?;
    Ok(r.map(axum::body::Body::new))
}

async fn metrics_text(axum::extract::State(state): axum::extract::State<State>) -> Reply {
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", metrics::CONTENT_TYPE)
        .body(Full::new(Bytes::from(metrics::render(&state))))
        .expect("static headers are valid"))
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
/// `project/service:port`), so clients encode each segment; a `%` not followed by two hex
/// digits, or an escape that decodes to invalid UTF-8, is a 400.
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

/// Query parameters as given (not percent-decoded); a key without `=` has an empty value.
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

/// `?QUERY` of a request as a map (see [`parse_query`]).
pub fn query_map(q: &Option<String>) -> HashMap<String, String> {
    parse_query(q.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            proxy: Proxy::new(dso_proxy::ProxyConfig::default()),
            started: Instant::now(),
            docker: crate::docker::DockerSlot::off(),
            secrets: None,
            events: crate::events::Bus::new(),
        }
    }

    /// One request through the router as a listener hands it over.
    async fn send(
        state: State,
        method: Method,
        path: &str,
        query: Option<&str>,
        body: Bytes,
    ) -> Response<axum::body::Body> {
        let uri = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .unwrap();
        dispatch(
            router().with_state(state),
            Peer::Local {
                uid: 0,
                gid: 0,
                pid: None,
            },
            req,
        )
        .await
    }

    async fn status(method: Method, path: &str, query: Option<&str>) -> StatusCode {
        send(state(), method, path, query, Bytes::new()).await.status()
    }

    async fn body_of(r: Response<axum::body::Body>) -> serde_json::Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
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

    #[tokio::test]
    async fn a_name_with_a_slash_is_one_parameter() {
        let state = state();
        for name in ["shop/web:8080", "echo"] {
            let l = dso_proxy::ListenerConfig::new(name, "127.0.0.1:0".parse().unwrap(), vec![]);
            state.proxy.add_listener(l).unwrap();
        }
        let r = send(
            state.clone(),
            Method::GET,
            "/v1/proxy/listeners/shop%2Fweb%3A8080",
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_of(r).await["name"], "shop/web:8080");
        // Unencoded, the slash splits the path: no such route.
        let r = send(
            state.clone(),
            Method::GET,
            "/v1/proxy/listeners/shop/web:8080",
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(
            body_of(r).await["error"]
                .as_str()
                .unwrap()
                .contains("no endpoint GET")
        );
        let r = send(
            state.clone(),
            Method::GET,
            "/v1/proxy/listeners/bad%zz",
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(
            body_of(r).await["error"]
                .as_str()
                .unwrap()
                .contains("two hex digits")
        );
        // Empty segments do not count, as before.
        let r = send(
            state,
            Method::GET,
            "//v1//proxy/listeners/echo/",
            None,
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_and_a_wrong_method_404() {
        let big = Bytes::from(vec![b' '; MAX_BODY + 1]);
        let r = send(state(), Method::POST, "/v1/secrets/notify", None, big).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            body_of(r).await["error"]
                .as_str()
                .unwrap()
                .contains("larger than")
        );
        let r = send(state(), Method::POST, "/v1/health", None, Bytes::new()).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body_of(r).await["error"],
            "no endpoint POST /v1/health; see docs/api.md"
        );
    }

    fn echo_module(_: State, req: ApiRequest) -> ReplyFuture {
        Box::pin(async move {
            match (req.method.as_str(), req.segments().as_slice()) {
                ("GET", []) => Some(json(StatusCode::OK, &"root")),
                ("PUT", ["items", name]) => Some(json(
                    StatusCode::OK,
                    &serde_json::json!({ "name": name, "query": req.query, "body": String::from_utf8_lossy(&req.body) }),
                )),
                _ => None,
            }
        })
    }

    #[tokio::test]
    async fn an_old_style_module_mounts_in_one_line() {
        let app = router()
            .merge(legacy("/v1/echo", echo_module))
            .with_state(state());
        let call = |method: Method, uri: &str, body: &'static str| {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            dispatch(app.clone(), Peer::Tcp("127.0.0.1:1".parse().unwrap()), req)
        };
        let r = call(Method::GET, "/v1/echo", "").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_of(r).await, "root");
        let r = call(Method::PUT, "/v1/echo/items/a%2Fb?x=1", "hello").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            body_of(r).await,
            serde_json::json!({ "name": "a/b", "query": { "x": "1" }, "body": "hello" })
        );
        let r = call(Method::GET, "/v1/echo/nothing", "").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body_of(r).await["error"],
            "no endpoint GET /v1/echo/nothing; see docs/api.md"
        );
        // The rest of the router is untouched.
        assert_eq!(call(Method::GET, "/v1/health", "").await.status(), StatusCode::OK);
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
                // What cannot be a request target cannot come off the wire either.
                let target = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                if target.parse::<Uri>().is_err() {
                    return Ok(());
                }
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
                        async {
                            let r = send(state, method, &path, query.as_deref(), Bytes::from(body)).await;
                            let status = r.status();
                            let bytes = r.into_body().collect().await.unwrap().to_bytes();
                            (status, bytes)
                        },
                    )
                    .await
                });
                let Ok((status, bytes)) = reply else {
                    // A swap with wait, or a drain wait: legal, just slow.
                    return Ok(());
                };
                if !status.is_success() {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    prop_assert!(!v["error"].as_str().unwrap_or("").is_empty(), "{v}");
                }
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
