//! `/v1/secrets`: what the agent watches (names, references, versions, provider health;
//! never a value) and `POST /v1/secrets/notify`, the "look now" that `dso secret set`
//! sends after writing the local vault.

use std::path::PathBuf;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::{ApiError, ApiRequest, Reply, State, json};
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

/// Routes `/v1/secrets/...`.
pub async fn handle(state: State, req: ApiRequest) -> Option<Reply> {
    let seg = req.segments();
    let reply = match (&req.method, seg.as_slice()) {
        (&Method::GET, []) => match secrets(&state) {
            Ok(s) => json(StatusCode::OK, &s.status().await),
            Err(e) => Err(e),
        },
        (&Method::POST, ["notify"]) => notify(&state, &req),
        _ => return None,
    };
    Some(reply)
}

fn notify(state: &State, req: &ApiRequest) -> Reply {
    let body: NotifyBody = req.json()?;
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
