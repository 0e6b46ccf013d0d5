//! The control API client used by every `dso` command that talks to a running agent.

use std::path::{Path, PathBuf};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// An error the agent answered with (`{"error": "..."}`), kept apart from transport errors
/// so that `main` can map a 4xx to the usage exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// The agent's message.
    pub message: String,
}

/// The agent could not be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the dso agent at {}: {source}\n\
     is the agent running? start it with `dso agent --config FILE`, \
     or point to its socket with --socket PATH or DSO_SOCKET",
    path.display()
)]
pub struct Unreachable {
    /// Socket path tried.
    pub path: PathBuf,
    /// Why the connection failed.
    #[source]
    pub source: std::io::Error,
}

/// Percent-encodes `text` as one URL path segment: every byte but the unreserved ones
/// (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`, so a listener name such as `shop/web:8080` stays
/// one segment (`shop%2Fweb%3A8080`). The agent decodes it after splitting the path.
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client of one agent's control socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the agent at `socket`.
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, decoded as `T`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let bytes = self.send(method.clone(), path, body).await?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("decoding the agent's answer to {method} {path}"))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Bytes> {
        let payload = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        self.send_raw(method, path, "application/json", payload).await
    }

    /// One request with a raw body of `content_type`; the raw answer on success,
    /// [`ApiFailure`] (the agent's `error` message) otherwise, [`Unreachable`] when no agent
    /// answers.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        payload: Bytes,
    ) -> anyhow::Result<Bytes> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| Unreachable {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("starting HTTP on the control socket")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "localhost")
            .header("content-type", content_type)
            .body(Full::new(payload))
            .context("building request")?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} on {}", self.socket.display()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the agent's answer")?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
            return Err(ApiFailure { status, message }.into());
        }
        Ok(bytes)
    }
}
