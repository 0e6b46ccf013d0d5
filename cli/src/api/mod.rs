//! The control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! `server.rs` owns the socket (creation, permissions, peer checks) and hands each request,
//! body already read, to the [`Router`]. The router picks a module by path prefix; each
//! module (`proxy.rs`, `metrics.rs`) matches the rest of the path itself. A later module
//! (rotations, services) is one more `mount` line in [`Router::new`].

mod metrics;
mod peer;
mod proxy;
mod rotations;
mod secrets;
mod server;

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

pub use server::bind;

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
}

/// One request, body read, path split after the module's prefix.
#[derive(Debug)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path segments after the mount prefix, percent-decoding not applied (names are
    /// restricted to characters that need none).
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
            .mount("/v1/secrets", |s, r| Box::pin(secrets::handle(s, r)))
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
            let req = ApiRequest {
                method: method.clone(),
                path: rest
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
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
    fn query_pairs() {
        let q = parse_query("timeout=30s&x&&y=1");
        assert_eq!(q.get("timeout").map(String::as_str), Some("30s"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
        assert_eq!(q.len(), 3);
    }
}
