//! `/v1/secrets`: what the agent watches (names, references, versions, provider health;
//! never a value) and `POST /v1/secrets/notify`, the "look now" that `dso secret set`
//! sends after writing the local vault.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State as With;
use hyper::StatusCode;
use hyper::body::Bytes;
use serde::Deserialize;

use super::{ApiError, Reply, State, json, parse_json};
use crate::secrets::Secrets;

/// Body of `POST /v1/secrets/notify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyBody {
    /// `local`: a local vault file changed (the only kind notified today).
    provider_kind: String,
    /// The vault file that changed.
    vault_file: Option<PathBuf>,
    /// The entry that changed (informational: the whole provider is polled).
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

fn secrets(state: &State) -> Result<Arc<Secrets>, ApiError> {
    state.secrets.clone().ok_or_else(|| ApiError {
        status: StatusCode::CONFLICT,
        message: "the agent's config has no providers or secrets; add a `secrets:` section".to_owned(),
    })
}

/// `GET /v1/secrets`.
pub async fn status(With(state): With<State>) -> Reply {
    let s = secrets(&state)?;
    json(StatusCode::OK, &s.status().await)
}

/// `POST /v1/secrets/notify`.
pub async fn notify(With(state): With<State>, body: Bytes) -> Reply {
    let body: NotifyBody = parse_json(&body)?;
    if body.provider_kind != "local" {
        return Err(ApiError::bad_request(format!(
            "provider_kind {:?} cannot be notified; only \"local\" is",
            body.provider_kind
        )));
    }
    let Some(file) = body.vault_file else {
        return Err(ApiError::bad_request("vault_file is required"));
    };
    let polled = match &state.secrets {
        Some(s) => s.notify_local(&file),
        None => Vec::new(),
    };
    json(StatusCode::ACCEPTED, &serde_json::json!({ "polled": polled }))
}
