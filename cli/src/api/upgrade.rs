//! `POST /v1/agent/upgrade`: asks the agent to hand its sockets to a new binary (hitless
//! upgrade, `crate::upgrade`) and answers once the new process is ready, or with why it
//! failed (the agent then serves on). Only root and the agent's own user may ask: the agent
//! starts the binary with its own privileges.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Extension;
use hyper::StatusCode;
use hyper::body::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc::UnboundedSender;

use super::{ApiError, Peer, Reply, json, parse_json};
use crate::upgrade::{DEFAULT_READY_TIMEOUT, Request};

/// Where upgrade requests go: the agent's main loop, which runs them one at a time.
static REQUESTS: OnceLock<UnboundedSender<Request>> = OnceLock::new();

/// Connects the endpoint to the agent's main loop (once, at start).
pub fn configure(tx: UnboundedSender<Request>) {
    let _ = REQUESTS.set(tx);
}

/// Body of `POST /v1/agent/upgrade`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    /// The binary to start instead of the path the agent was started from.
    binary: Option<PathBuf>,
    /// Milliseconds the new process has to report ready (default 30000).
    ready_timeout_ms: Option<u64>,
}

/// Longest `ready_timeout_ms` taken.
const MAX_READY_TIMEOUT: Duration = Duration::from_secs(600);

/// `POST /v1/agent/upgrade`.
pub async fn upgrade(peer: Option<Extension<Peer>>, body: Bytes) -> Reply {
    let own = super::peer::own_uid().unwrap_or(0);
    match peer {
        Some(Extension(Peer::Local { uid, .. })) if uid == 0 || uid == own => {}
        _ => {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: "permission denied: only root and the agent's user may upgrade the agent (it starts a binary with the agent's privileges)".to_owned(),
            });
        }
    }
    let body: UpgradeBody = parse_json(&body)?;
    if let Some(b) = &body.binary
        && !b.is_absolute()
    {
        return Err(ApiError::bad_request(format!(
            "binary {}: give an absolute path",
            b.display()
        )));
    }
    let ready_timeout = body
        .ready_timeout_ms
        .map_or(DEFAULT_READY_TIMEOUT, Duration::from_millis);
    if ready_timeout.is_zero() || ready_timeout > MAX_READY_TIMEOUT {
        return Err(ApiError::bad_request(format!(
            "ready_timeout_ms must be between 1 and {}",
            MAX_READY_TIMEOUT.as_millis()
        )));
    }
    let Some(tx) = REQUESTS.get() else {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "this agent cannot be upgraded (not started by `dso agent`)".to_owned(),
        });
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let gone = || ApiError {
        status: StatusCode::CONFLICT,
        message: "the agent is shutting down or was already replaced by an upgrade; nothing started"
            .to_owned(),
    };
    tx.send(Request {
        binary: body.binary,
        ready_timeout,
        reply: Some(reply),
    })
    .map_err(|_| gone())?;
    match answer.await {
        Ok(Ok(outcome)) => json(StatusCode::OK, &outcome),
        Ok(Err(message)) => Err(ApiError {
            status: StatusCode::BAD_GATEWAY,
            message,
        }),
        Err(_) => Err(gone()),
    }
}
