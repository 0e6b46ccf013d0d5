//! The HTTP listener on TCP (`agent.http.listen`, default `127.0.0.1:8471`): the same
//! router as the control socket, with only the [`PUBLIC`] paths reachable; every other path
//! answers the router's 404 there (the control endpoints stay on the Unix socket, where
//! peers are checked). The connection cap, eviction and timeouts are the socket's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::response::IntoResponse;
use hyper::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::server::Conns;
use super::{ApiError, Peer, State};

/// The paths the HTTP listener serves (any method the router serves on them).
pub const PUBLIC: &[&str] = &["/health", "/metrics", "/v1/events", "/v1/webhook"];

/// A bound HTTP listener, not yet serving.
#[derive(Debug)]
pub struct HttpServer {
    listener: TcpListener,
    addr: SocketAddr,
    /// Cancelled when a new agent took the socket over: stop accepting, let connections
    /// finish until `stop`.
    handed_over: CancellationToken,
}

/// Binds the HTTP listener at `addr`; the error names `agent.http.listen` and the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<HttpServer> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("agent.http.listen: cannot bind {addr} (set another address, or `listen: off`)")
    })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(HttpServer {
        listener,
        addr,
        handed_over: CancellationToken::new(),
    })
}

/// The HTTP listener handed over by the agent this process replaces (`upgrade.rs`).
pub fn inherit(listener: std::net::TcpListener) -> anyhow::Result<HttpServer> {
    listener
        .set_nonblocking(true)
        .context("the HTTP listener handed over")?;
    let addr = listener.local_addr().context("the HTTP listener handed over")?;
    let listener = TcpListener::from_std(listener).context("the HTTP listener handed over")?;
    Ok(HttpServer {
        listener,
        addr,
        handed_over: CancellationToken::new(),
    })
}

impl HttpServer {
    /// The bound address (the kernel's port when the config gave port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A duplicate of the listening socket, for a handover.
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    /// Cancel it once a new agent serves the socket: this one stops accepting.
    pub fn handover_token(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, state: State, stop: CancellationToken) {
        let app = super::router().with_state(state);
        let conns = Conns::new();
        let mut last_warning: Option<Instant> = None;
        info!(addr = %self.addr, "HTTP listener serving /health, /metrics, /v1/events, /v1/webhook");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                () = self.handed_over.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let (stream, from) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "HTTP listener accept failed; retrying in 50 ms");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(permit) = conns.slot(&stop).await else {
                break;
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            conns.spawn(permit, stream, true, stop.clone(), move |req: Request<Incoming>| {
                let app = app.clone();
                async move {
                    if !is_public(req.uri().path()) {
                        return ApiError::not_found(format!(
                            "no endpoint {} {} on the HTTP listener; the control API is on the Unix socket (see docs/api.md)",
                            req.method(),
                            req.uri().path()
                        ))
                        .into_response();
                    }
                    super::dispatch(app, Peer::Tcp(from), req).await
                }
            });
        }
    }
}

/// Whether `path` (as sent; empty segments do not count) is one of [`PUBLIC`].
pub fn is_public(path: &str) -> bool {
    let clean: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let clean = format!("/{}", clean.join("/"));
    PUBLIC.contains(&clean.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_public_paths_pass() {
        for p in ["/health", "/metrics", "//metrics/", "/v1/events", "/v1/webhook"] {
            assert!(is_public(p), "{p}");
        }
        for p in [
            "/",
            "/v1/health",
            "/v1/services",
            "/v1/proxy",
            "/v1/vault/secrets/x",
            "/healthz",
            "/metrics/x",
        ] {
            assert!(!is_public(p), "{p}");
        }
    }
}
