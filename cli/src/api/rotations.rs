//! `/v1/rotations` and `/v1/services`: rotations of managed containers and their status.
//! Answered only by an agent started with `--docker`.

use std::sync::Arc;

use axum::extract::State as With;
use hyper::StatusCode;
use hyper::body::Bytes;
use serde::Deserialize;

use super::{ApiError, Params, Reply, State, json, parse_json};
use crate::docker::Docker;

/// Body of `POST /v1/rotations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Service (`project/service` or `service`) or container name or ID.
    target: String,
    /// `rolling`, `restart`, `signal`, `none` or `auto`; default: the container's label.
    #[serde(default)]
    strategy: Option<String>,
    /// Environment values for the new container, as `KEY=VALUE` strings.
    #[serde(default)]
    env: Vec<String>,
    /// Read the service's secrets from their providers now and deliver them.
    #[serde(default)]
    refresh: bool,
    /// Like `refresh`, also retrying versions whose rotation failed.
    #[serde(default)]
    force: bool,
}

/// The Docker side; 409 when the agent runs without it, 503 while it waits for the engine.
fn docker(state: &State) -> Result<Arc<Docker>, ApiError> {
    state.docker.get().map_err(|e| ApiError {
        status: match e {
            crate::docker::Unavailable::Off => StatusCode::CONFLICT,
            crate::docker::Unavailable::Waiting(_) => StatusCode::SERVICE_UNAVAILABLE,
        },
        message: e.to_string(),
    })
}

/// `GET /v1/rotations`.
pub async fn list(With(state): With<State>) -> Reply {
    docker(&state).and_then(|d| json(StatusCode::OK, &d.list()))
}

/// `GET /v1/rotations/{id}`.
pub async fn get(With(state): With<State>, p: Params) -> Reply {
    let id = p.first();
    let d = docker(&state)?;
    let t = d
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no rotation request {id}")))?;
    json(StatusCode::OK, &t)
}

/// `GET /v1/services`.
pub async fn services(With(state): With<State>) -> Reply {
    let d = docker(&state)?;
    match d.rotator.status().await {
        Ok(mut s) => {
            // `dso up` services recreated by a plain `docker compose up`: shown with the fix.
            match d.recreated_without_override().await {
                Ok(recreated) => {
                    for r in recreated {
                        match s.iter_mut().find(|x| x.service == r.service) {
                            Some(x) => x.error = Some(r.message),
                            None => s.push(dso_rotator::ServiceStatus {
                                service: r.service,
                                strategy: dso_rotator::Strategy::Auto,
                                ports: Vec::new(),
                                containers: r.containers,
                                rotating: false,
                                last: None,
                                error: Some(r.message),
                            }),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check for Compose services recreated without dso's override")
                }
            }
            json(StatusCode::OK, &s)
        }
        Err(e) => Err(ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: e.to_string(),
        }),
    }
}

/// `POST /v1/rotations`.
pub async fn submit(With(state): With<State>, body: Bytes) -> Reply {
    let state = &state;
    let d = docker(state)?;
    if state.proxy.is_shutting_down() || d.is_closed() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "the agent is shutting down; no new rotation is started".to_owned(),
        });
    }
    let body: RotateBody = parse_json(&body)?;
    let strategy = body
        .strategy
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| ApiError::bad_request(format!("strategy: {e}")))?;
    let env = body
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| ApiError::bad_request(format!("env: {kv:?} is not KEY=VALUE")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if body.target.trim().is_empty() {
        return Err(ApiError::bad_request("target: empty"));
    }
    if body.refresh || body.force {
        if strategy.is_some() || !env.is_empty() {
            return Err(ApiError::bad_request(
                "refresh/force deliver the providers' current values with the service's own strategy; leave out strategy and env",
            ));
        }
        let deliverer = state
            .secrets
            .as_ref()
            .and_then(|s| s.deliverer())
            .ok_or_else(|| ApiError {
                status: StatusCode::CONFLICT,
                message: "no secret delivery runs in this agent (no `secrets:` in its config)".to_owned(),
            })?;
        let scan = d.rotator.subscribe_scans().borrow().clone();
        let key = scan
            .as_deref()
            .ok_or_else(|| ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the agent has not scanned Docker yet; try again".to_owned(),
            })?
            .find(&body.target)
            .map_err(|e| ApiError::not_found(e.to_string()))?
            .key
            .clone();
        if !deliverer.refresh(&key, body.force) {
            return Err(ApiError::not_found(format!(
                "service {key} consumes no secret (no dso.secrets label naming a configured secret, no secrets[].targets match)"
            )));
        }
        return json(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "service": key.to_string(),
                "refresh": true,
                "force": body.force,
                "message": format!("the providers of {key}'s secrets are read now; the rotation follows as for a change (see `dso rotate` history in `dso status`, GET /v1/delivery)"),
            }),
        );
    }
    let id = d.submit(body.target, strategy, env);
    json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id }))
}

/// `GET /v1/delivery`: per service, the secrets it consumes and its deliveries (no value).
pub async fn delivery(With(state): With<State>) -> Reply {
    let status = state
        .secrets
        .as_ref()
        .and_then(|s| s.deliverer())
        .map(|d| d.status())
        .unwrap_or_default();
    json(StatusCode::OK, &serde_json::json!({ "services": status }))
}
